"""Smoothing and seed aggregation: per-run EMA, alignment on shared completions, mean and SEM."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SHIFT_KEYS = (  # unmasked curvature shifts; CAPO runs log the post-mask ones under masked_key(key)
    "curvature/token_fisher_mean",
    "curvature/global_fisher",
    "curvature/token_hessian_mean",
    "curvature/global_hessian",
)
REJECT_KEY = "select/token_reject_rate"
HEALTH_KEYS = ("objective/entropy", "rollout/response_length_mean", "objective/grad_norm")
BEST_KEYS = ("train/reward_mean", "train/accuracy", "val/accuracy")  # also summarised by their per-run maximum


def masked_key(key: str) -> str:
    """``curvature/token_fisher_mean`` -> ``curvature/masked_token_fisher_mean`` (the post-mask shift)."""
    return key.replace("curvature/", "curvature/masked_", 1)


# metric key -> default EMA alpha: 0.1 for accuracy and reward (the paper's Fig. 1 script), 0.35 for the
# shifts and the rejection rate (Figs. 3 and 5) and the health curves; none (1.0) for held-out accuracy, whose
# few points are evaluations of separate checkpoints (an EMA over 3 points would report a made-up number)
DEFAULT_EMA: dict[str, float] = {
    "train/accuracy": 0.1,
    "train/reward_mean": 0.1,
    "val/accuracy": 1.0,
    **{key: 0.35 for key in SHIFT_KEYS},
    **{masked_key(key): 0.35 for key in SHIFT_KEYS},
    REJECT_KEY: 0.35,
    **{key: 0.35 for key in HEALTH_KEYS},
}


@dataclass
class Curve:
    """One group's aggregated curve of one metric.

    Attributes:
        x: the completions present in every run that has the metric, ascending.
        mean: mean over those runs of their EMA-smoothed values at ``x``.
        sem: standard error of that mean, sample std (ddof=1) / sqrt(n); 0.0 when n = 1.
        n: the number of runs averaged.
        ema: the EMA alpha used (1.0 = no smoothing).
        raw_mean: mean over the same runs of their unsmoothed values at ``x`` (drawn faintly behind ``mean``).
    """

    x: np.ndarray
    mean: np.ndarray
    sem: np.ndarray
    n: int
    ema: float
    raw_mean: np.ndarray = field(default_factory=lambda: np.array([]))


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
        smoothed[index] = value if index == 0 else alpha * value + (1.0 - alpha) * smoothed[index - 1]
    return smoothed


def mean_sem(values: Sequence[float] | np.ndarray) -> tuple[float, float, int]:
    """Mean and standard error of the mean over runs.

    Args:
        values: one value per run (NaN values are dropped first).

    Returns:
        ``(mean, sem, n)`` with sem = sample standard deviation (ddof=1) / sqrt(n), 0.0 for n = 1;
        ``(nan, nan, 0)`` when no value is left.
    """
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    n = int(array.size)
    if n == 0:
        return math.nan, math.nan, 0
    sem = float(np.std(array, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(np.mean(array)), sem, n


def aggregate(series: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float) -> Curve:
    """Smooth each run, align the runs on their shared completions, then mean ± SEM per point.

    Per run: the EMA (``ema``) over all its points in x order; where one x occurs several times the last
    smoothed value at it is kept. Across runs: only the x values present in every run (intersection);
    at each, the mean over runs and SEM = std(ddof=1) / sqrt(n), 0.0 when n = 1.

    Args:
        series: per run, ``(x, y)`` sorted by x (``Run.series``); runs with no point are skipped.
        alpha: the EMA alpha, in (0, 1].

    Returns:
        The group's curve; empty arrays when no x is shared by all runs.
    """
    per_run, raw_per_run = [], []
    for x_values, y_values in series:
        if len(x_values):
            x_list = np.asarray(x_values, dtype=float).tolist()
            per_run.append(dict(zip(x_list, ema(y_values, alpha).tolist())))
            raw_per_run.append(dict(zip(x_list, np.asarray(y_values, dtype=float).tolist())))
    if not per_run:
        return Curve(np.array([]), np.array([]), np.array([]), 0, alpha)
    shared = sorted(set.intersection(*(set(points) for points in per_run)))
    matrix = np.array([[points[x] for x in shared] for points in per_run], dtype=float).reshape(len(per_run), -1)
    raw = np.array([[points[x] for x in shared] for points in raw_per_run], dtype=float).reshape(len(per_run), -1)
    n = len(per_run)
    mean = matrix.mean(axis=0)
    sem = matrix.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(shared))
    return Curve(np.array(shared, dtype=float), mean, sem, n, alpha, raw.mean(axis=0))


def last_and_best(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[list[float], list[float]]:
    """Each run's last raw (unsmoothed) value (at its largest x, the last row there) and its largest raw value.

    Args:
        series: per run, ``(x, y)`` sorted by x; runs with no point are skipped.

    Returns:
        ``(last, best)``, one value per run that has points.
    """
    last = [float(y_values[-1]) for _, y_values in series if len(y_values)]
    best = [float(np.max(y_values)) for _, y_values in series if len(y_values)]
    return last, best
