"""Reward functions: ``reward(completions, answers, **columns) -> list[float]`` (contract:
``base.py``).

Rooms by cost: :mod:`~capo_lightning.rewards.extract` (string extraction),
:mod:`~capo_lightning.rewards.grading` and :mod:`~capo_lightning.rewards.sympy_guard` (equivalence),
:mod:`~capo_lightning.rewards.verifier` with :mod:`~capo_lightning.rewards._grader` (the timed
process pool), :mod:`~capo_lightning.rewards.math` (the math
reward), :mod:`~capo_lightning.rewards.format` and :mod:`~capo_lightning.rewards.shaping` (format
rewards, wrappers).
"""

from capo_lightning.rewards.base import RewardFn, pop_stats
from capo_lightning.rewards.extract import extract_answer, last_boxed
from capo_lightning.rewards.format import FormatReward, format_reward, think_format_reward
from capo_lightning.rewards.grading import is_equivalent
from capo_lightning.rewards.math import Grade, MathReward, answer_key, math_reward
from capo_lightning.rewards.shaping import OverlongPenalty, WeightedSum

__all__ = [
    "FormatReward",
    "Grade",
    "MathReward",
    "OverlongPenalty",
    "RewardFn",
    "WeightedSum",
    "answer_key",
    "extract_answer",
    "format_reward",
    "is_equivalent",
    "last_boxed",
    "math_reward",
    "pop_stats",
    "think_format_reward",
]
