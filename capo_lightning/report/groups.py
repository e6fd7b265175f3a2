"""Runs grouped by their configuration (``group_key``: objective, selector, regime, lr, starting policy, the
selector's shadow optimizer and calibration), seeds as replicates, and each group's numbers."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from capo_lightning.report.curves import BEST_KEYS, DEFAULT_SMOOTHING, Curve, Rule, aggregate, last_and_best, mean_sem
from capo_lightning.report.runs import Run

FACETS = ("objective", "selector", "regime", "lr", "policy", "shadow", "calibration", "advance_when_monitoring")
GENERIC_FOLDERS = frozenset(
    {"policy", "model", "hf", "export", "exported", "checkpoints", "checkpoint", "final", "last", "latest", "out"}
)  # folder names that say nothing about which policy a path holds: ``policy_name`` looks above them


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


def group_key(run: Run) -> tuple:
    """Everything that makes a run another configuration; runs of one key (seeds) are replicates.

    Args:
        run: a run whose config was read.

    Returns:
        The run's ``FACETS`` in order: objective, selector (as ``Run.selector`` names it, thresholds or
        calibration included), regime, lr, policy, shadow, calibration, advance_when_monitoring.
    """
    return tuple(getattr(run, facet) for facet in FACETS)


def policy_name(policy: str) -> str:
    """A short, readable name of a starting policy for labels.

    ``bundled:smollm2-135m-instruct`` -> ``smollm2-135m-instruct``; a Hub id or a path -> its last folder
    name that is not a generic one (``GENERIC_FOLDERS``: ``runs/warm_start/policy`` -> ``warm_start``);
    ``tiny:3`` stays as it is.

    Args:
        policy: ``model.policy.name_or_path``.

    Returns:
        The short name (the whole string when nothing shorter fits).
    """
    if policy.startswith("bundled:"):
        return policy.removeprefix("bundled:")
    parts = [part for part in policy.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    for part in reversed(parts):
        if part.lower() not in GENERIC_FOLDERS:
            return part
    return parts[-1] if parts else policy


def auto_label(run: Run, show_lr: bool = False, show_policy: bool = False) -> str:
    """A run's group label: ``"GRPO + CAPO δF 0.0001 τH 0.01 · aggressive, lr 7.5e-05, from warm_start"``.

    The selector is named only when it masks (``+ CAPO ...``, see ``Run.selector``: thresholds or
    ``auto p95`` when calibrated, ``(SGD shadow)``); a measuring-only selector reads as the baseline with
    ``(monitor)`` (``(monitor, Adam shadow)`` when it advances its shadow optimizer); no selector and KeepAll
    (bit-identical to none) leave it out.

    Args:
        run: a run whose config was read.
        show_lr: append ``lr <lr>`` after the regime (``group_runs`` sets it when runs of the regime differ
            in lr).
        show_policy: append ``from <policy_name>`` (``group_runs`` sets it when the runs start from
            different policies); a run without a known policy gets nothing.

    Returns:
        ``"<objective>[ + <selector> | (monitor...)] · <regime>[, lr <lr>][, from <policy>]"``.
    """
    if run.enforces:
        head = f"{run.objective} + {run.selector}"
    else:
        _, monitor, details = run.selector.partition(" (monitor")
        head = f"{run.objective}{monitor}{details}" if monitor else run.objective
    where = [run.regime]
    if show_lr:
        where.append("lr unknown" if run.lr is None else f"lr {run.lr:g}")
    if show_policy and run.policy is not None:
        where.append(f"from {policy_name(run.policy)}")
    return f"{head} · {', '.join(where)}"


def _facet_text(facet: str, value: Any) -> str:
    """How a disambiguating suffix names one facet's value (each facet's texts differ when its values do)."""
    if facet == "selector":
        return "no selector" if value == "none" else value
    if facet == "lr":
        return "lr unknown" if value is None else f"lr {value!r}"
    if facet == "policy":
        return f"policy {value}"
    if facet == "shadow":
        return "no shadow" if value is None else f"{value} shadow"
    if facet == "calibration" and value is not None:
        return f"calibration {value.steps} steps p{value.percentile!r} lr {value.lr!r}"
    if facet == "calibration":
        return "fixed thresholds"
    if facet == "advance_when_monitoring":
        return "advance_when_monitoring" if value else "no advance_when_monitoring"
    return str(value)


def auto_labels(runs: list[Run]) -> dict[tuple, str]:
    """The automatic label of each configuration (``group_key``) among ``runs``, one label per key.

    ``, lr <lr>`` follows the regime only for a regime whose runs here have several learning rates (a ladder:
    ``"GRPO · aggressive, lr 7.5e-05"``); where all runs of a regime share one lr it stays ``"GRPO ·
    aggressive"`` (an unnamed regime prints its lr anyway: ``"GRPO · lr 2e-05, 32/step"``). ``, from
    <policy_name>`` follows only when the runs here start from several policies, and then on every label.
    So labels stay the plain ones while these facets are equal across the runs. When different keys
    would still print the same label (no selector vs KeepAll, two policies with one short name), each gets
    ``" [<facet>, ...]"`` naming its values of the facets in which those keys differ
    (``" [no selector]"``, ``" [KeepAll]"``, ``" [policy a/warm_start/policy]"``).

    Args:
        runs: the runs to label (those without a ``--label`` override).

    Returns:
        ``group_key`` -> label, in the order of each key's first run.
    """
    lrs_of_regime: dict[str, set[float | None]] = defaultdict(set)
    for run in runs:
        lrs_of_regime[run.regime].add(run.lr)
    show_policy = len({run.policy for run in runs if run.policy is not None}) > 1
    keys_of: dict[str, list[tuple]] = {}
    for run in runs:
        key = group_key(run)
        label = auto_label(run, show_lr=len(lrs_of_regime[run.regime]) > 1, show_policy=show_policy)
        if key not in keys_of.setdefault(label, []):
            keys_of[label].append(key)
    labels = {}
    for label, keys in keys_of.items():
        differing = [index for index in range(len(FACETS)) if len({key[index] for key in keys}) > 1]
        for key in keys:
            suffix = ", ".join(_facet_text(FACETS[index], key[index]) for index in differing)
            labels[key] = f"{label} [{suffix}]" if suffix else label
    return labels


def group_runs(runs: list[Run], overrides: dict[int, str] | None = None) -> tuple[list[Group], list[str]]:
    """Group runs by configuration (``group_key``) under their ``auto_labels`` label, or by a user override.

    Two runs that differ in any facet of ``group_key`` (objective, selector, regime, lr, policy, shadow
    optimizer, calibration, advance_when_monitoring) never share a group: ``auto_labels`` gives different
    keys different labels. Runs given the same override label form one group, whatever their configs.
    Groups come in the order of their first run.

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
                    f"group '{group.label}': {count} runs share seed {seed} ({paths}); counted as {count} replicates"
                )
    return list(groups.values()), notes


def _stat(values: list[float]) -> dict[str, float | int]:
    mean, sem, n = mean_sem(values)
    return {"mean": mean, "sem": sem, "n": n}


def summarize_group(group: Group, ema_alpha: Rule | float | None = None) -> tuple[dict[str, Any], list[str]]:
    """Aggregate every known metric of a group (``DEFAULT_SMOOTHING``'s keys) and fill ``group.curves``.

    For each metric at least one run logged: the curve (``aggregate``: per-run smoothing, alignment on the
    completions shared by all those runs, mean ± SEM), ``final`` = mean and SEM over runs of each run's
    last raw (unsmoothed) value, and for ``BEST_KEYS`` ``best`` = mean and SEM over runs of each run's
    largest raw value. SEM = std(ddof=1) / sqrt(n), 0.0 for one run.

    Args:
        group: the group; its ``curves`` are replaced.
        ema_alpha: one rule for all metrics: EMA alpha (1 = none), ``EMA`` or ``Window``; None: ``DEFAULT_SMOOTHING``.

    Returns:
        ``(entry, notes)``: the group's ``summary.json`` entry, with keys ``runs``, ``seeds``, ``curves``
        (metric -> ``x``, ``mean``, ``sem``, ``n``, ``ema`` | ``window`` (other: None), ``smoothing``, ``raw_mean``),
        ``final``, ``best`` (metric -> ``mean``, ``sem``, ``n``); notes on metrics some runs lack or with no shared x.
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
        if len(present) < len(group.runs):
            notes.append(
                f"group '{group.label}': {key} is logged by {len(present)} of its {len(group.runs)} runs; "
                "its curve and final value average those"
            )
        curve = aggregate(present, default_rule if ema_alpha is None else ema_alpha)
        if curve.x.size == 0:
            notes.append(
                f"group '{group.label}': the runs logging {key} share no completions value; no curve "
                "(runs of different batch sizes in one group?)"
            )
        group.curves[key] = curve
        curves[key] = {
            "x": curve.x.tolist(),
            "mean": curve.mean.tolist(),
            "sem": curve.sem.tolist(),
            "n": curve.n,
            "ema": curve.ema,
            "window": curve.window,
            "smoothing": curve.smoothing,
            "raw_mean": curve.raw_mean.tolist(),
        }
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
