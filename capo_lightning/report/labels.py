"""What makes a run's configuration (``group_key``: its ``FACETS``) and the automatic label of
each configuration (``auto_labels``), as legends and ``summary.json`` name groups."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from capo_lightning.report.runs import Run

FACETS = (
    "objective",
    "selector",
    "regime",
    "lr",
    "policy",
    "shadow",
    "calibration",
    "advance_when_monitoring",
)
# folder names that say nothing about which policy a path holds: ``policy_name`` looks above them
GENERIC_FOLDERS = frozenset(
    {
        "policy",
        "model",
        "hf",
        "export",
        "exported",
        "checkpoints",
        "checkpoint",
        "final",
        "last",
        "latest",
        "out",
    }
)


def group_key(run: Run) -> tuple:
    """Everything that makes a run another configuration; runs of one key (seeds) are replicates.

    Args:
        run: a run whose config was read.

    Returns:
        The run's ``FACETS`` in order: objective, selector (as ``Run.selector`` names it, thresholds
        or calibration included), regime, lr, policy, shadow, calibration, advance_when_monitoring.
    """
    return tuple(getattr(run, facet) for facet in FACETS)


def policy_name(policy: str) -> str:
    """A short, readable name of a starting policy for labels.

    ``bundled:smollm2-135m-instruct`` -> ``smollm2-135m-instruct``; a Hub id or a path -> its last
    folder name that is not a generic one (``GENERIC_FOLDERS``: ``runs/warm_start/policy`` ->
    ``warm_start``); ``tiny:3`` stays as it is.

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
    """A run's group label:
    ``"GRPO + CAPO δF 0.0001 τH 0.01 · aggressive, lr 7.5e-05, from warm_start"``.

    The selector is named only when it masks (``+ CAPO ...``, see ``Run.selector``: thresholds or
    ``auto p95`` when calibrated, ``(SGD shadow)``); a measuring-only selector reads as the baseline
    with ``(monitor)`` (``(monitor, Adam shadow)`` when it advances its shadow optimizer); no
    selector and KeepAll (bit-identical to none) leave it out.

    Args:
        run: a run whose config was read.
        show_lr: append ``lr <lr>`` after the regime (``group_runs`` sets it when runs of the regime
            differ in lr).
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
    """How a disambiguating suffix names one facet's value (each facet's texts differ when its
    values do)."""
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

    ``, lr <lr>`` follows the regime only for a regime whose runs here have several learning rates
    (a ladder: ``"GRPO · aggressive, lr 7.5e-05"``); where all runs of a regime share one lr it
    stays ``"GRPO · aggressive"`` (an unnamed regime prints its lr anyway:
    ``"GRPO · lr 2e-05, 32/step"``). ``, from <policy_name>`` follows only when the runs here start
    from several policies, and then on every label.
    So labels stay the plain ones while these facets are equal across the runs. When different keys
    would still print the same label (no selector vs KeepAll, two policies with one short name),
    each gets ``" [<facet>, ...]"`` naming its values of the facets in which those keys differ
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
