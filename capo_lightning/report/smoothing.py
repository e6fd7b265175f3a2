"""The smoothing rules of a run's curve: an EMA over its points (:class:`EMA`) or a trailing window
of completions (:class:`Window`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EMA:
    """Exponential moving average over a run's points in x order (``ema``).

    Attributes:
        alpha: the weight of the newest value, in (0, 1]; 1 = no smoothing.
    """

    alpha: float

    def __post_init__(self) -> None:
        """Refuse an alpha outside (0, 1]."""
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"an EMA alpha must be in (0, 1] (1 = no smoothing), got {self.alpha}")

    @property
    def description(self) -> str:
        """``"EMA α 0.35"``, or ``"no smoothing"`` for alpha 1."""
        return "no smoothing" if self.alpha == 1.0 else f"EMA α {self.alpha:g}"

    @property
    def smooths(self) -> bool:
        """Whether the rule can change a value (alpha < 1)."""
        return self.alpha < 1.0

    def smooth(
        self, x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """The EMA of ``y`` (``x`` is not used: the EMA counts points, not completions).

        Args:
            x: the run's cumulative completions, ascending.
            y: the raw values at ``x``.

        Returns:
            The smoothed values, one per point.
        """
        return ema(y, self.alpha)


@dataclass(frozen=True)
class Window:
    """A trailing window of ``completions``, each step weighted by its completions.

    A run's rows at cumulative completions x_1 < x_2 < ... hold y_i, the mean over that step's
    n_i = x_i - x_(i-1) completions (x_0 = 0). The smoothed value at x_i is sum_j n_j y_j / sum_j
    n_j over the rows j <= i with x_j > x_i - completions: with 64, a run of 16 completions per step
    averages its last 4 steps, one of 192 per step is not smoothed (its window holds its own step
    only), and early points average what exists so far. A row logged every k steps stands for the k
    steps' completions since the row before.

    Attributes:
        completions: the window's width W in completions, > 0.
    """

    completions: float

    def __post_init__(self) -> None:
        """Refuse a width that is not a positive finite number."""
        if not (math.isfinite(self.completions) and self.completions > 0):
            raise ValueError(
                "a smoothing window must be a positive number of completions, got "
                f"{self.completions}"
            )

    @property
    def description(self) -> str:
        """``"trailing window of 64 completions"``."""
        return f"trailing window of {self.completions:g} completions"

    @property
    def smooths(self) -> bool:
        """Always True: a run with fewer completions per step than the width is averaged."""
        return True

    def smooth(
        self, x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """The completion-weighted trailing mean of ``y`` at each x (see the class).

        Several rows at one x count as one step whose value is the last row's; each of those rows
        gets that step's smoothed value. A window of one step gives that step's value exactly; where
        a window's weights sum to 0 (a first row at x <= 0) its plain mean is used.

        Args:
            x: the run's cumulative completions, ascending (ties allowed).
            y: the raw values at ``x``.

        Returns:
            The smoothed values, one per row.
        """
        xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if xs.size == 0:
            return ys.copy()
        last = np.append(xs[1:] != xs[:-1], True)  # the last row of each x
        steps, values = xs[last], ys[last]
        weights = np.diff(steps, prepend=0.0).clip(min=0.0)
        smoothed = np.empty_like(steps)
        for index, step in enumerate(steps):
            start = int(np.searchsorted(steps, step - self.completions, side="right"))
            window_weights, window_values = weights[start : index + 1], values[start : index + 1]
            total = window_weights.sum()
            if index == start or total <= 0:  # its own step only (exactly its value), or no weight
                smoothed[index] = window_values.mean()
            else:
                smoothed[index] = (window_weights * window_values).sum() / total
        return smoothed[np.searchsorted(steps, xs)]


Rule = EMA | Window


def as_rule(rule: Rule | float) -> Rule:
    """A smoothing rule; a number is an EMA alpha.

    Args:
        rule: an ``EMA``, a ``Window`` or an EMA alpha in (0, 1].

    Returns:
        The rule.
    """
    return rule if isinstance(rule, (EMA, Window)) else EMA(float(rule))


def ema(values: Sequence[float] | np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average: s_0 = y_0, s_t = alpha * y_t + (1 - alpha) * s_{t-1}.

    The same as pandas' ``ewm(alpha=alpha, adjust=False).mean()``; ``alpha = 1`` returns the values.

    Args:
        values: the raw values in x order.
        alpha: the weight of the newest value, in (0, 1].

    Returns:
        The smoothed values, a float array of the same length.
    """
    raw = np.asarray(values, dtype=float)
    smoothed = np.empty_like(raw)
    for index, value in enumerate(raw):
        smoothed[index] = (
            value if index == 0 else alpha * value + (1.0 - alpha) * smoothed[index - 1]
        )
    return smoothed
