"""Smoothing and seed aggregation: per-run rules (EMA, trailing window in completions, from
:mod:`~capo_lightning.report.smoothing`), alignment on shared completions, mean and SEM."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from capo_lightning import keys
from capo_lightning.report.smoothing import EMA, Rule, Window, as_rule

SHIFT_KEYS = (  # unmasked curvature shifts; CAPO runs log the post-mask ones under masked_key(key)
    keys.TOKEN_FISHER_MEAN,
    keys.GLOBAL_FISHER,
    keys.TOKEN_HESSIAN_MEAN,
    keys.GLOBAL_HESSIAN,
)
REJECT_KEY = keys.TOKEN_REJECT_RATE
HEALTH_KEYS = (keys.ENTROPY, keys.RESPONSE_LENGTH_MEAN, keys.GRAD_NORM)
# also summarised by their per-run maximum
BEST_KEYS = (keys.REWARD_MEAN, keys.ACCURACY, keys.VAL_ACCURACY)


def masked_key(key: str) -> str:
    """``curvature/token_fisher_mean`` -> ``curvature/masked_token_fisher_mean`` (the post-mask
    shift)."""
    return keys.masked(key)


# metric key -> smoothing rule: a trailing window of 64 completions for training accuracy and reward
# (an EMA over few points lags far behind a short curve; the window does not, and is the
# sample-efficiency measure's rule too), EMA 0.35 for the shifts and the rejection rate (Figs. 3
# and 5) and the health curves; none (EMA 1) for held-out accuracy, whose few points are evaluations
# of separate checkpoints
DEFAULT_SMOOTHING: dict[str, Rule] = {
    keys.ACCURACY: Window(64.0),
    keys.REWARD_MEAN: Window(64.0),
    keys.VAL_ACCURACY: EMA(1.0),
    **{key: EMA(0.35) for key in SHIFT_KEYS},
    **{masked_key(key): EMA(0.35) for key in SHIFT_KEYS},
    REJECT_KEY: EMA(0.35),
    **{key: EMA(0.35) for key in HEALTH_KEYS},
}


@dataclass
class Curve:
    """One group's aggregated curve of one metric.

    Attributes:
        x: the completions present in every run that has the metric, ascending.
        mean: mean over those runs of their smoothed values at ``x``.
        sem: standard error of that mean, sample std (ddof=1) / sqrt(n); 0.0 when n = 1.
        n: the number of runs averaged.
        rule: the smoothing rule used (``EMA`` or ``Window``).
        raw_mean: mean over the same runs of their unsmoothed values at ``x`` (drawn faintly behind
            ``mean``).
    """

    x: np.ndarray
    mean: np.ndarray
    sem: np.ndarray
    n: int
    rule: Rule
    raw_mean: np.ndarray = field(default_factory=lambda: np.array([]))

    @property
    def ema(self) -> float | None:
        """The EMA alpha of an EMA curve (1.0 = no smoothing); None for a window."""
        return self.rule.alpha if isinstance(self.rule, EMA) else None

    @property
    def window(self) -> float | None:
        """The window's width in completions; None for an EMA curve."""
        return self.rule.completions if isinstance(self.rule, Window) else None

    @property
    def smoothing(self) -> str:
        """The rule in words: ``"trailing window of 64 completions"``, ``"EMA α 0.35"``,
        ``"no smoothing"``."""
        return self.rule.description


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


def aggregate(
    series: Sequence[tuple[np.ndarray, np.ndarray]],
    rule: Rule | float | None = None,
    *,
    alpha: float | None = None,
) -> Curve:
    """Smooth each run, align the runs on their shared completions, then mean ± SEM per point.

    Per run: ``rule.smooth`` over all its points in x order (an EMA, or a trailing window in
    completions); where one x occurs several times the last smoothed value at it is kept. Across
    runs: only the x values present in every run (intersection); at each, the mean over runs and
    SEM = std(ddof=1) / sqrt(n), 0.0 when n = 1.

    Args:
        series: per run, ``(x, y)`` sorted by x (``Run.series``); runs with no point are skipped.
        rule: an ``EMA``, a ``Window``, or a number: an EMA alpha in (0, 1].
        alpha: the older spelling of an EMA alpha, instead of ``rule``.

    Returns:
        The group's curve; empty arrays when no x is shared by all runs.

    Raises:
        ValueError: neither or both of ``rule`` and ``alpha`` given.
    """
    if (rule is None) == (alpha is None):
        raise ValueError("aggregate needs one smoothing rule: rule= or alpha=")
    rule = as_rule(alpha if rule is None else rule)
    per_run, raw_per_run = [], []
    for x_values, y_values in series:
        if len(x_values):
            x_list = np.asarray(x_values, dtype=float).tolist()
            per_run.append(dict(zip(x_list, rule.smooth(x_values, y_values).tolist())))
            raw_per_run.append(dict(zip(x_list, np.asarray(y_values, dtype=float).tolist())))
    if not per_run:
        return Curve(np.array([]), np.array([]), np.array([]), 0, rule)
    shared = sorted(set.intersection(*(set(points) for points in per_run)))
    matrix = np.array([[points[x] for x in shared] for points in per_run], dtype=float).reshape(
        len(per_run), -1
    )
    raw = np.array([[points[x] for x in shared] for points in raw_per_run], dtype=float).reshape(
        len(per_run), -1
    )
    n = len(per_run)
    mean = matrix.mean(axis=0)
    sem = matrix.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(shared))
    return Curve(np.array(shared, dtype=float), mean, sem, n, rule, raw.mean(axis=0))


def last_and_best(
    series: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[list[float], list[float]]:
    """Each run's last raw (unsmoothed) value (at its largest x, the last row there) and its largest
    raw value.

    Args:
        series: per run, ``(x, y)`` sorted by x; runs with no point are skipped.

    Returns:
        ``(last, best)``, one value per run that has points.
    """
    last = [float(y_values[-1]) for _, y_values in series if len(y_values)]
    best = [float(np.max(y_values)) for _, y_values in series if len(y_values)]
    return last, best
