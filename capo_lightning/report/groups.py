"""Runs grouped by their configuration (``group_key`` of :mod:`~capo_lightning.report.labels`:
objective, selector, regime, lr, starting policy, the selector's shadow optimizer and calibration),
seeds as replicates, and each group's numbers."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from capo_lightning.report.curves import (
    BEST_KEYS,
    DEFAULT_SMOOTHING,
    Curve,
    aggregate,
    last_and_best,
    mean_sem,
)
from capo_lightning.report.labels import auto_labels, group_key
from capo_lightning.report.runs import Run
from capo_lightning.report.smoothing import Rule


@dataclass
class Group:
    """Runs of one configuration (seeds are replicates) and their aggregated curves.

    Attributes:
        label: the name in legends and in ``summary.json``.
        runs: the runs, in command-line order.
        curves: metric key -> aggregated curve (``summarize_group`` fills it).
    """

    label: str
    runs: list[Run]
    curves: dict[str, Curve] = field(default_factory=dict)

    @property
    def enforces(self) -> bool:
        """Whether the group's selector masks tokens (any of its runs does)."""
        return any(run.enforces for run in self.runs)

    @property
    def seeds(self) -> list[Any]:
        """``seed_everything`` of each run, in run order (None where unknown)."""
        return [run.seed for run in self.runs]


def group_runs(
    runs: list[Run], overrides: dict[int, str] | None = None
) -> tuple[list[Group], list[str]]:
    """Group runs by configuration (``group_key``) under their ``auto_labels`` label, or by a user
    override.

    Two runs that differ in any facet of ``group_key`` (objective, selector, regime, lr, policy,
    shadow optimizer, calibration, advance_when_monitoring) never share a group: ``auto_labels``
    gives different keys different labels. Runs given the same override label form one group,
    whatever their configs. Groups come in the order of their first run.

    Args:
        runs: the runs, in command-line order.
        overrides: run index -> label (``--label RUN_DIR=NAME``).

    Returns:
        ``(groups, notes)``; a note names every group in which several runs share a seed (they still
        count as separate replicates).
    """
    overrides = overrides or {}
    labels = auto_labels([run for index, run in enumerate(runs) if index not in overrides])
    groups: dict[str, Group] = {}
    for index, run in enumerate(runs):
        label = overrides.get(index)
        if label is None:
            label = labels[group_key(run)]
        groups.setdefault(label, Group(label, [])).runs.append(run)
    notes = []
    for group in groups.values():
        counts = Counter(seed for seed in group.seeds if seed is not None)
        for seed, count in counts.items():
            if count > 1:
                paths = ", ".join(str(run.path) for run in group.runs if run.seed == seed)
                notes.append(
                    f"group '{group.label}': {count} runs share seed {seed} ({paths}); counted as "
                    f"{count} replicates"
                )
    return list(groups.values()), notes


def _stat(values: list[float]) -> dict[str, float | int]:
    mean, sem, n = mean_sem(values)
    return {"mean": mean, "sem": sem, "n": n}


def _aggregate(
    group: Group, key: str, present: list, rule: Rule | float
) -> tuple[Curve, list[str]]:
    """The group's curve of ``key`` over the runs that logged it (``present``: their series), and
    notes when some runs lack it or the runs share no x."""
    notes = []
    if len(present) < len(group.runs):
        notes.append(
            f"group '{group.label}': {key} is logged by {len(present)} of its "
            f"{len(group.runs)} runs; its curve and final value average those"
        )
    curve = aggregate(present, rule)
    if curve.x.size == 0:
        notes.append(
            f"group '{group.label}': the runs logging {key} share no completions value; no "
            "curve (runs of different batch sizes in one group?)"
        )
    return curve, notes


def _curve_entry(curve: Curve) -> dict[str, Any]:
    """A curve as ``summary.json`` holds it."""
    return {
        "x": curve.x.tolist(),
        "mean": curve.mean.tolist(),
        "sem": curve.sem.tolist(),
        "n": curve.n,
        "ema": curve.ema,
        "window": curve.window,
        "smoothing": curve.smoothing,
        "raw_mean": curve.raw_mean.tolist(),
    }


def summarize_group(
    group: Group, ema_alpha: Rule | float | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Aggregate every known metric of a group (``DEFAULT_SMOOTHING``'s keys) and fill
    ``group.curves``.

    For each metric at least one run logged: the curve (``aggregate``: per-run smoothing, alignment
    on the completions shared by all those runs, mean ± SEM), ``final`` = mean and SEM over runs of
    each run's last raw (unsmoothed) value, and for ``BEST_KEYS`` ``best`` = mean and SEM over runs
    of each run's largest raw value. SEM = std(ddof=1) / sqrt(n), 0.0 for one run.

    Args:
        group: the group; its ``curves`` are replaced.
        ema_alpha: one rule for all metrics: EMA alpha (1 = none), ``EMA`` or ``Window``; None:
            ``DEFAULT_SMOOTHING``.

    Returns:
        ``(entry, notes)``: the group's ``summary.json`` entry, with keys ``runs``, ``seeds``,
        ``curves`` (metric -> ``x``, ``mean``, ``sem``, ``n``, ``ema`` | ``window`` (other: None),
        ``smoothing``, ``raw_mean``), ``final``, ``best`` (metric -> ``mean``, ``sem``, ``n``);
        notes on metrics some runs lack or with no shared x.
    """
    notes: list[str] = []
    curves: dict[str, dict[str, Any]] = {}
    final: dict[str, dict[str, float | int]] = {}
    best: dict[str, dict[str, float | int]] = {}
    group.curves = {}
    for key, default_rule in DEFAULT_SMOOTHING.items():
        present = [series for series in (run.series(key) for run in group.runs) if len(series[0])]
        if not present:
            continue
        rule = default_rule if ema_alpha is None else ema_alpha
        curve, curve_notes = _aggregate(group, key, present, rule)
        notes += curve_notes
        group.curves[key], curves[key] = curve, _curve_entry(curve)
        last, largest = last_and_best(present)
        final[key] = _stat(last)
        if key in BEST_KEYS:
            best[key] = _stat(largest)
    entry = {
        "runs": [str(run.path) for run in group.runs],
        "seeds": group.seeds,
        "curves": curves,
        "final": final,
        "best": best,
    }
    return entry, notes


def plain(value: Any) -> Any:
    """``value`` with NaN and infinities as None and numpy scalars as Python numbers (strict JSON).

    Args:
        value: nested dicts, lists, tuples, floats, ints, strings, None or numpy scalars.

    Returns:
        The same structure, safe for ``json.dumps(..., allow_nan=False)``.
    """
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
