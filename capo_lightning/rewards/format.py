"""Format rewards: does a completion follow the answer format (a box, a think block)? Correctness is
not checked."""

from __future__ import annotations

from typing import Any

from capo_lightning.rewards.base import check_lengths
from capo_lightning.rewards.extract import TAIL_CHARS, last_boxed

__all__ = ["FormatReward", "format_reward", "think_format_reward"]


class FormatReward:
    r"""1.0 per completion that follows the answer format, else 0.0; correctness is not checked.

    Args:
        require_box: the last box must be closed and non-empty (``\boxed{}`` alone fails).
        require_think: exactly one ``<think>...</think>`` block with non-empty content, opened
            before it is closed; with ``require_box`` the box must come after ``</think>``.
    """

    def __init__(self, require_box: bool = True, require_think: bool = False) -> None:
        if not (require_box or require_think):
            raise ValueError("FormatReward needs require_box or require_think (or both)")
        self.require_box, self.require_think = require_box, require_think
        self.__name__ = "think_format_reward" if require_think else "format_reward"

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        check_lengths(completions, answers)
        return [float(self._follows(str(c))) for c in completions]

    def _follows(self, text: str) -> bool:
        answer_part = text
        if self.require_think:
            if text.count("<think>") != 1 or text.count("</think>") != 1:
                return False
            before, _, answer_part = text.partition("</think>")
            if "<think>" not in before or not before.split("<think>", 1)[1].strip():
                return False
        return not self.require_box or bool((last_boxed(answer_part[-TAIL_CHARS:]) or "").strip())


format_reward = FormatReward()
think_format_reward = FormatReward(require_think=True)
