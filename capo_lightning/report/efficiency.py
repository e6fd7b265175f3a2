"""The paper's sample efficiency with a bootstrap interval over seeds.

The reference arm's (conservative GRPO's) smoothed mean training accuracy at its final number of
completions is the target; each arm's efficiency is the completions the reference used divided by
the completions the arm needs until its smoothed mean first reaches the target and stays there
(``crossing``): "N×", or never.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from capo_lightning.report.smoothing import Rule, as_rule

SUSTAIN = 64.0  # completions a crossing must hold for (Fig. 1 and summary.json)
Series = Sequence[tuple[np.ndarray, np.ndarray]]
Runs = list[dict[float, float]]  # per run: x -> smoothed value


def _smoothed_runs(series: Series, rule: Rule | float) -> Runs:
    """Per run with points: x -> smoothed value (the last one where an x repeats), as ``aggregate``
    keeps it."""
    rule = as_rule(rule)
    runs = []
    for x_values, y_values in series:
        if len(x_values):
            x_list = np.asarray(x_values, dtype=float).tolist()
            runs.append(dict(zip(x_list, rule.smooth(x_values, y_values).tolist())))
    return runs


def _mean_of(runs: Runs, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over ``runs[i]`` for i in ``indices`` (repeats count again) on the x all of them
    share."""
    chosen = [runs[index] for index in indices]
    if not chosen:
        return np.array([]), np.array([])
    shared = sorted(set.intersection(*(set(points) for points in chosen)))
    matrix = np.array([[points[x] for x in shared] for points in chosen], dtype=float).reshape(
        len(chosen), -1
    )
    return np.array(shared, dtype=float), matrix.mean(axis=0)


def mean_curve(series: Series, rule: Rule | float) -> tuple[np.ndarray, np.ndarray]:
    """An arm's smoothed mean curve: each run smoothed with ``rule``, aligned on shared x, mean over
    runs.

    The same numbers as ``curves.aggregate(series, rule).mean`` (the curve Fig. 1 draws).

    Args:
        series: per run, ``(x, y)`` sorted by x; runs with no point are skipped.
        rule: an ``EMA``, a ``Window`` or an EMA alpha.

    Returns:
        ``(x, mean)``; empty arrays when there is no run or no shared x.
    """
    runs = _smoothed_runs(series, rule)
    return _mean_of(runs, range(len(runs)))


def crossing(x: np.ndarray, y: np.ndarray, target: float, sustain: float) -> float | None:
    """The first x_i with y_i >= target that holds: every later point with x_j <= x_i + sustain is
    >= target too.

    A point with no later point within ``sustain`` (the last point, in particular) counts when it
    reaches the target: nothing contradicts it. So an arm whose final value is its target crosses at
    its final point at the latest. A NaN value never reaches the target.

    Args:
        x: completions, ascending.
        y: the smoothed values at ``x``.
        target: the value to reach.
        sustain: completions after x_i during which the curve must stay at or above the target, >=
            0.

    Returns:
        x_i, or None when the curve never reaches the target in a sustained way.
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if sustain < 0:
        raise ValueError(f"sustain must be >= 0 completions, got {sustain}")
    reached = ys >= target
    for index in np.flatnonzero(reached):
        later = slice(index + 1, int(np.searchsorted(xs, xs[index] + sustain, side="right")))
        if reached[later].all():
            return float(xs[index])
    return None


def target_of(reference_series: Series, rule: Rule | float) -> tuple[float, float]:
    """The reference arm's smoothed mean at its final completions, and those completions.

    Args:
        reference_series: the reference arm's runs, ``(x, y)`` each.
        rule: the smoothing rule.

    Returns:
        ``(target, reference completions)``.

    Raises:
        ValueError: the reference has no run with points, or its runs share no x.
    """
    x, mean = mean_curve(reference_series, rule)
    if x.size == 0:
        raise ValueError(
            "the reference arm has no curve (no run with points, or its runs share no completions)"
        )
    return float(mean[-1]), float(x[-1])


@dataclass(frozen=True)
class Efficiency:
    """One arm's sample efficiency against the reference.

    Attributes:
        target: the reference's smoothed mean at its final completions.
        reference_completions: those completions.
        crossing: the completions at which the arm's smoothed mean first reaches the target and
            holds it for ``sustain`` completions (``crossing``); None = never.
        ratio: "N×" = reference_completions / crossing; None = never (inf for a crossing at 0
            completions).
        interval: the 2.5 % and 97.5 % percentiles of the bootstrap ratios (a draw that never
            crosses counts 0).
        never_fraction: the fraction of bootstrap draws that never crossed.
        n_boot: the number of bootstrap draws.
        sustain: the completions a crossing must hold for.
        smoothing: the rule in words (``"trailing window of 64 completions"``).
    """

    target: float
    reference_completions: float
    crossing: float | None
    ratio: float | None
    interval: tuple[float, float]
    never_fraction: float
    n_boot: int
    sustain: float
    smoothing: str

    def as_dict(self) -> dict[str, Any]:
        """The fields as a ``summary.json`` entry (``interval`` as a two-element list)."""
        return {
            "target": self.target,
            "reference_completions": self.reference_completions,
            "crossing": self.crossing,
            "ratio": self.ratio,
            "interval": list(self.interval),
            "never_fraction": self.never_fraction,
            "n_boot": self.n_boot,
            "sustain": self.sustain,
            "smoothing": self.smoothing,
        }


def _ratio(reference_completions: float, crossed: float | None) -> float | None:
    """reference completions / crossing; None for never, inf for a crossing at 0 completions."""
    if crossed is None:
        return None
    return reference_completions / crossed if crossed > 0 else math.inf


def _estimate(
    arm_runs: Runs,
    arm: Sequence[int],
    reference_runs: Runs,
    reference: Sequence[int],
    sustain: float,
) -> tuple[float, float, float | None]:
    """``(target, reference completions, crossing)`` of the chosen runs (indices may repeat)."""
    reference_x, reference_mean = _mean_of(reference_runs, reference)
    if reference_x.size == 0:
        raise ValueError("the reference arm's runs share no completions: no target")
    target, completions = float(reference_mean[-1]), float(reference_x[-1])
    return target, completions, crossing(*_mean_of(arm_runs, arm), target, sustain)


def _bootstrap(
    arm_runs: Runs, reference_runs: Runs, sustain: float, n_boot: int, seed: int
) -> tuple[tuple[float, float], float]:
    """The 2.5 % and 97.5 % percentiles of the draws' ratios (0 for never) and the fraction of
    draws that never crossed; both arms resampled with replacement."""
    rng = np.random.default_rng(seed)
    # few distinct resamples
    cache: dict[tuple[tuple[int, ...], tuple[int, ...]], float | None] = {}
    ratios, never = np.zeros(n_boot), np.zeros(n_boot, dtype=bool)
    for draw in range(n_boot):
        arm = tuple(sorted(rng.integers(0, len(arm_runs), len(arm_runs)).tolist()))
        reference = tuple(
            sorted(rng.integers(0, len(reference_runs), len(reference_runs)).tolist())
        )
        if (arm, reference) not in cache:
            _, completions, crossed = _estimate(arm_runs, arm, reference_runs, reference, sustain)
            cache[arm, reference] = _ratio(completions, crossed)
        ratio = cache[arm, reference]
        never[draw] = ratio is None
        ratios[draw] = 0.0 if ratio is None else ratio
    low, high = np.percentile(ratios, [2.5, 97.5])
    return (float(low), float(high)), float(never.mean())


def sample_efficiency(
    arm_series: Series,
    reference_series: Series,
    rule: Rule | float,
    sustain: float,
    n_boot: int = 2000,
    seed: int = 0,
) -> Efficiency:
    """The paper's sample efficiency of one arm, with a percentile bootstrap interval over seeds.

    Point estimate: target and reference completions from ``target_of``, the arm's ``crossing`` of
    the target on its ``mean_curve``, ratio = reference completions / crossing. Each of ``n_boot``
    draws resamples the arm's runs and, independently, the reference's runs with replacement (same
    sizes), recomputes target, crossing and ratio (never = 0); the interval is the draws' 2.5 % and
    97.5 % percentiles (numpy's linear interpolation). Deterministic given ``seed``: one
    ``numpy.random.default_rng(seed)`` draws, per draw, the arm's indices, then the reference's
    (``integers(0, n, n)``). With 3 seeds an arm has only 10 distinct resamples, so the interval is
    coarse: it shows the spread between seeds, not a fine error bar. The reference compared with
    itself crosses at its final point at the latest, so its ratio is >= 1.

    Args:
        arm_series: the arm's runs, ``(x, y)`` each, sorted by x.
        reference_series: the reference arm's runs.
        rule: the smoothing rule (an ``EMA``, a ``Window`` or an EMA alpha).
        sustain: completions a crossing must hold for, >= 0.
        n_boot: the number of bootstrap draws, >= 1.
        seed: the seed of the bootstrap's generator.

    Returns:
        The ``Efficiency``.

    Raises:
        ValueError: the arm or the reference has no run with points, the reference's runs share no
            x, ``n_boot`` < 1 or ``sustain`` < 0.
    """
    rule = as_rule(rule)
    arm_runs = _smoothed_runs(arm_series, rule)
    reference_runs = _smoothed_runs(reference_series, rule)
    if not arm_runs or not reference_runs:
        raise ValueError(
            "sample_efficiency needs at least one run with points in the arm and in the reference"
        )
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    target, completions, crossed = _estimate(
        arm_runs, range(len(arm_runs)), reference_runs, range(len(reference_runs)), sustain
    )
    interval, never_fraction = _bootstrap(arm_runs, reference_runs, sustain, n_boot, seed)
    return Efficiency(
        target=target,
        reference_completions=completions,
        crossing=crossed,
        ratio=_ratio(completions, crossed),
        interval=interval,
        never_fraction=never_fraction,
        n_boot=n_boot,
        sustain=float(sustain),
        smoothing=rule.description,
    )
