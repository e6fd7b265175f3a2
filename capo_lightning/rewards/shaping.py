"""Reward wrappers: DAPO's overlong penalty on a base reward, and weighted sums of rewards."""

from __future__ import annotations

from typing import Any

from capo_lightning.rewards.base import RewardFn, pop_stats
from capo_lightning.rewards.math import math_reward

__all__ = ["OverlongPenalty", "WeightedSum"]


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13) added to a base reward.

        R_len(y) = 0                              if |y| <= L_max - L_cache
                   ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                   -1                             if |y| > L_max

    |y| is the completion's length in tokens: the DataModule passes ``completion_tokens`` and
    ``max_new_tokens`` columns to every reward function. L_max is the rollout budget (or
    ``max_tokens``) and L_cache = ``cache_fraction`` x L_max (DAPO: 4096 of 20480, i.e. 0.2). The
    penalty is scaled by ``factor`` and added to ``reward_fn``'s reward. Use it as
    ``data.reward_fn: {class_path: capo_lightning.rewards.shaping.OverlongPenalty}``.

    Args:
        reward_fn: the base reward.
        cache_fraction: L_cache / L_max, the soft band before L_max where the penalty ramps to -1.
        factor: scale of the penalty (DAPO uses 1).
        max_tokens: L_max; None = the rollout's max_new_tokens.
    """

    def __init__(
        self,
        reward_fn: RewardFn = math_reward,
        cache_fraction: float = 0.2,
        factor: float = 1.0,
        max_tokens: int | None = None,
    ) -> None:
        if not 0 < cache_fraction <= 1:
            raise ValueError(
                f"OverlongPenalty cache_fraction must be in (0, 1], got {cache_fraction}"
            )
        self.reward_fn, self.cache_fraction, self.factor, self.max_tokens = (
            reward_fn,
            cache_fraction,
            factor,
            max_tokens,
        )
        self.__name__ = (
            f"OverlongPenalty({getattr(reward_fn, '__name__', type(reward_fn).__name__)})"
        )

    def penalty(self, length: int, max_tokens: int) -> float:
        """R_len of a completion of ``length`` tokens under budget L_max = ``max_tokens``, times
        ``factor``."""
        cache = self.cache_fraction * max_tokens
        soft_start = max_tokens - cache
        if length <= soft_start:
            return 0.0
        if length <= max_tokens:
            return self.factor * (soft_start - length) / cache
        return -self.factor

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        """Base reward plus the length penalty of each completion."""
        if "completion_tokens" not in columns:
            raise ValueError(
                "OverlongPenalty needs the completion_tokens column (the RolloutDataModule passes "
                "it)"
            )
        budgets = (
            columns.get("max_new_tokens")
            if self.max_tokens is None
            else [self.max_tokens] * len(completions)
        )
        if budgets is None:
            raise ValueError("OverlongPenalty needs max_tokens or the max_new_tokens column")
        base = self.reward_fn(completions, answers, **columns)
        lengths = columns["completion_tokens"]
        return [
            float(r) + self.penalty(int(n), int(m))
            for r, n, m in zip(base, lengths, budgets, strict=True)
        ]

    def pop_stats(self) -> dict[str, float]:
        """The base reward's stats (``verifier/*`` of the math reward), passed on."""
        return pop_stats(self.reward_fn)


class WeightedSum:
    """A weighted sum of reward functions, e.g. ``math_reward + 0.1 * think_format_reward``.

    Args:
        rewards: reward functions with the common signature.
        weights: one weight per reward (default all 1.0).
    """

    def __init__(self, rewards: list[RewardFn], weights: list[float] | None = None) -> None:
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if not rewards or len(weights) != len(rewards):
            raise ValueError(
                f"WeightedSum needs one weight per reward: got {len(rewards)} rewards and "
                f"{len(weights)} weights (data.reward_fn.init_args.weights)"
            )
        self.rewards, self.weights = list(rewards), weights
        names = [getattr(r, "__name__", type(r).__name__) for r in rewards]
        self.__name__ = " + ".join(f"{w:g}*{n}" for w, n in zip(weights, names))

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        total = [0.0] * len(completions)
        for reward, weight in zip(self.rewards, self.weights):
            values = reward(completions, answers, **columns)
            total = [t + weight * float(v) for t, v in zip(total, values, strict=True)]
        return total

    def pop_stats(self) -> dict[str, float]:
        """The merged stats of the parts that report any."""
        stats: dict[str, float] = {}
        for reward in self.rewards:
            stats.update(pop_stats(reward))
        return stats
