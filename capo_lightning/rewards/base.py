"""The reward-function contract, shared by every reward and by the DataModule that calls them.

A reward function is any callable ``reward(completions, answers, **columns) -> list[float]``: one
float per completion, in order. ``columns`` are the prompt source's extra columns plus
``completion_tokens``, ``truncated`` and ``max_new_tokens`` (see
:func:`capo_lightning.data.rollout.compute_rewards`). A reward that also has ``pop_stats()`` reports
what it measured since the last call (the math reward's ``verifier/*``); :func:`pop_stats` is the
one place that asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["RewardFn", "check_lengths", "pop_stats"]

RewardFn = Callable[..., list[float]]
"""``reward(completions: list[str], answers: list[str], **columns) -> list[float]``."""


def pop_stats(source: Any) -> dict[str, float]:
    """What ``source`` collected since the last call, if it keeps stats (has ``pop_stats()``), else
    ``{}``.

    The one place that asks: the DataModule (rewards, engines) and the reward wrappers, which pass
    their inner reward's stats on, so that ``verifier/*`` survives wrapping.
    """
    pop = getattr(source, "pop_stats", None)
    return dict(pop()) if callable(pop) else {}


def check_lengths(completions: list[str], answers: list[str]) -> None:
    """Raises ValueError unless there is exactly one answer per completion."""
    if len(completions) != len(answers):
        raise ValueError(
            f"Got {len(completions)} completions but {len(answers)} answers; "
            "pass exactly one gold answer per completion (repeat each answer once per "
            "sample of its prompt)."
        )
