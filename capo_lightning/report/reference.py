"""The reference group of a report and what it marks on the figures: Fig. 1's target (its final
training accuracy, and each group's sustained crossing of it) and Fig. 3's dashed lines (the
maximum of its shift curves)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.axes import Axes

from capo_lightning.report.curves import masked_key
from capo_lightning.report.efficiency import SUSTAIN, crossing
from capo_lightning.report.groups import Group


def has_curve(group: Group, key: str) -> bool:
    """Whether the group has a non-empty curve of ``key``."""
    return key in group.curves and group.curves[key].x.size > 0


def shift_key(group: Group, key: str) -> str:
    """The key a group plots for an unmasked shift key: the ``masked_`` one when its selector
    enforces (Fig. 3)."""
    return masked_key(key) if group.enforces else key


def reference_group(
    groups: Sequence[Group], reference: str | None, has: Callable[[Group], bool]
) -> Group | None:
    """The reference group: the one labelled ``reference``, else the first whose selector does not
    enforce.

    Args:
        groups: all groups.
        reference: the reference group's label, None for the default.
        has: whether a group has the curve needed; a group without it is no reference.

    Returns:
        The group, or None when no candidate has the curve.
    """
    if reference is not None:
        candidates = [group for group in groups if group.label == reference]
    else:
        candidates = [group for group in groups if not group.enforces]
    return next((group for group in candidates if has(group)), None)


def draw_target(
    axes: Axes, groups: Sequence[Group], key: str, reference: str | None, scale: float
) -> bool:
    """Fig. 1's target: the reference group's smoothed mean at its final completions as a dashed
    line, and a star at each group's first sustained crossing of it (``efficiency.crossing`` on the
    curve drawn, sustained for ``efficiency.SUSTAIN`` completions): the sample-efficiency measure of
    ``summary.json``, drawn.

    Args:
        axes: the panel, its curves drawn.
        groups: all groups, in order (colours ``C<index>``).
        key: the metric (``train/accuracy``).
        reference: the reference group's label, None for the default (``reference_group``).
        scale: the factor the curves were drawn with.

    Returns:
        Whether a reference group with the curve was found (False: nothing drawn).
    """
    group = reference_group(groups, reference, lambda candidate: has_curve(candidate, key))
    if group is None:
        return False
    value = float(group.curves[key].mean[-1])
    axes.axhline(
        value * scale, linestyle="--", color="black", linewidth=1, label=f"{group.label} (final)"
    )
    label = f"first crossing held {SUSTAIN:g} completions"
    for index, candidate in enumerate(groups):
        if not has_curve(candidate, key):
            continue
        curve = candidate.curves[key]
        crossed = crossing(curve.x, curve.mean, value, SUSTAIN)
        if crossed is not None:
            y = curve.mean[int(np.searchsorted(curve.x, crossed))] * scale
            axes.plot(
                [crossed],
                [y],
                "*",
                color=f"C{index % 10}",
                markersize=13,
                markeredgecolor="black",
                label=label,
            )
            label = None
    return True


def reference_line(
    groups: Sequence[Group], key: str, reference: str | None
) -> tuple[float, str] | None:
    """The dashed line of one Fig. 3 panel: the maximum of the reference group's mean curve.

    The reference is the group labelled ``reference``, else the first group whose selector does not
    enforce and that has ``key`` (``reference_group``); the curve is the one that group plots
    (``shift_key``).

    Args:
        groups: all groups, with their curves.
        key: an unmasked shift key (``SHIFT_KEYS``).
        reference: the reference group's label, None for the default.

    Returns:
        ``(value, label)``, or None when the reference group has no such curve.
    """
    group = reference_group(
        groups, reference, lambda candidate: has_curve(candidate, shift_key(candidate, key))
    )
    if group is None:
        return None
    return float(np.max(group.curves[shift_key(group, key)].mean)), group.label


def missing_reference(reference: str | None) -> str:
    """Who lacks a curve when no reference line can be drawn (the start of a note)."""
    if reference is not None:
        return f"group '{reference}' has"
    return "no group without an enforcing selector has"
