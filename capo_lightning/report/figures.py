"""The paper-style figures as PNG files, drawn on matplotlib's Agg canvas (pyplot's global state is
not touched)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from capo_lightning import keys
from capo_lightning.report.curves import (
    HEALTH_KEYS,
    REJECT_KEY,
    SHIFT_KEYS,
    Curve,
)
from capo_lightning.report.groups import Group
from capo_lightning.report.reference import (
    draw_target,
    has_curve,
    missing_reference,
    reference_line,
    shift_key,
)
from capo_lightning.report.smoothing import Window

DPI = 120
X_LABEL = "completions"
BAND = "mean ± SEM over seeds"
SHIFT_PANELS = tuple(
    zip(
        SHIFT_KEYS,
        ("m_F (token)", "m_F (global)", "m_H (token)", "m_H (global)"),
        ("policy shift m_F (KL, nats)",) * 2 + ("objective shift m_H (objective units)",) * 2,
    )
)
HEALTH_PANELS = tuple(
    zip(
        HEALTH_KEYS,
        ("Policy entropy", "Response length", "Gradient norm"),
        (
            "entropy (nats/token)",
            "mean response length (tokens)",
            "gradient norm before clipping (L2)",
        ),
    )
)


def _smoothing(groups: Sequence[Group], keys: Sequence[str]) -> str:
    """``"EMA α 0.35, faint: raw, mean ± SEM over seeds"`` or
    ``"trailing window of 64 completions, ..."`` from the rules of the curves drawn (several: all
    listed)."""
    curves = [group.curves[key] for group in groups for key in keys if key in group.curves]
    alphas = sorted({curve.ema for curve in curves if curve.ema is not None and curve.ema < 1.0})
    windows = sorted({curve.window for curve in curves if curve.window is not None})
    parts = [f"EMA α {', '.join(f'{alpha:g}' for alpha in alphas)}"] if alphas else []
    parts += [Window(window).description for window in windows]
    return f"{'; '.join(parts)}, faint: raw, {BAND}" if parts else BAND


def _new_figure(rows: int, cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def _band(
    axes: Axes, curve: Curve, label: str, color: str, scale: float = 1.0, marker: str | None = None
) -> None:
    """The mean as a line, mean ± SEM as a shaded band, and (when smoothed) the raw mean as a faint
    line."""
    if curve.rule.smooths and curve.raw_mean.size == curve.x.size:
        axes.plot(curve.x, curve.raw_mean * scale, color=color, alpha=0.3, linewidth=0.8)
    axes.plot(curve.x, curve.mean * scale, label=label, color=color, marker=marker, markersize=4)
    lower, upper = (curve.mean - curve.sem) * scale, (curve.mean + curve.sem) * scale
    axes.fill_between(curve.x, lower, upper, color=color, alpha=0.2, linewidth=0)


def _finish(axes: Axes, title: str, y_label: str) -> None:
    axes.set_title(title)
    axes.set_xlabel(X_LABEL)
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def _save(figure: Figure, out: Path, name: str) -> str:
    figure.savefig(out / name, dpi=DPI)
    return name


def single_metric_figure(
    groups: Sequence[Group],
    key: str,
    out: Path,
    name: str,
    title: str,
    y_label: str,
    scale: float = 1.0,
    target: bool = False,
    reference: str | None = None,
) -> tuple[list[str], list[str]]:
    """One metric against completions, a line and band per group that has it.

    Args:
        groups: all groups, in order (a group's colour is ``C<its index>`` in every figure).
        key: the metric key.
        out: the output folder.
        name: the PNG file name.
        title: the axes title.
        y_label: the y-axis label, with its unit.
        scale: factor applied to mean and SEM before drawing (100 for percent).
        target: also draw the reference's final value and each group's sustained crossing of it
            (``draw_target``, Fig. 1).
        reference: the reference group's label for ``target``; None: the default
            (``reference_group``).

    Returns:
        ``(files written, notes)``; nothing is written when no group has the metric.
    """
    if not any(has_curve(group, key) for group in groups):
        return [], [f"{name} not written: no run logged {key}"]
    notes = [
        f"{name}: group '{group.label}' has no {key} curve; left out"
        for group in groups
        if not has_curve(group, key)
    ]
    figure, axes = _new_figure(1, 1, 7.5, 4.8)
    marker = "o" if key == keys.VAL_ACCURACY else None
    for index, group in enumerate(groups):
        if has_curve(group, key):
            _band(axes[0, 0], group.curves[key], group.label, f"C{index % 10}", scale, marker)
    if target and not draw_target(axes[0, 0], groups, key, reference, scale):
        whose = missing_reference(reference)
        notes.append(f"{name}: no target (final) line: {whose} a {key} curve")
    _finish(axes[0, 0], f"{title}\n{_smoothing(groups, [key])}", y_label)
    return [_save(figure, out, name)], notes


def shifts_figure(
    groups: Sequence[Group], out: Path, reference: str | None
) -> tuple[list[str], list[str]]:
    """``fig3_shifts.png``: m_F and m_H at token and global level (the paper's Fig. 3), 2 x 2
    panels.

    Groups whose selector does not enforce plot the unmasked keys, enforcing (CAPO) groups the
    ``masked_`` keys; a dashed line marks the maximum of the reference group's mean curve
    (``reference_line``).

    Args:
        groups: all groups, in order.
        out: the output folder.
        reference: the label of the reference group, None for the default.

    Returns:
        ``(files written, notes)``; nothing is written when no group logged a shift.
    """
    name = "fig3_shifts.png"
    logged = [
        group
        for group in groups
        if any(has_curve(group, shift_key(group, key)) for key in SHIFT_KEYS)
    ]
    if not logged:
        return [], [
            f"{name} not written: no run logged curvature/* shifts (a run needs a selector; "
            "conf/selector/capo_monitor.yaml measures without masking)"
        ]
    notes = [
        f"{name}: group '{group.label}' logged no curvature shifts (no selector); absent from the "
        "panels"
        for group in groups
        if group not in logged
    ]
    figure, axes = _new_figure(2, 2, 12, 8)
    without_line = [
        title
        for panel, (key, title, y_label) in zip(axes.flat, SHIFT_PANELS)
        if not _shift_panel(panel, groups, key, title, y_label, reference)
    ]
    if without_line:
        whose = missing_reference(reference)
        notes.append(
            f"{name}: no reference (max) line in {', '.join(without_line)}: {whose} that curve"
        )
    plotted = [shift_key(group, key) for group in groups for key in SHIFT_KEYS]
    figure.suptitle(
        f"Curvature shifts, post-mask for enforcing selectors ({_smoothing(groups, plotted)})"
    )
    return [_save(figure, out, name)], notes


def _shift_panel(
    panel: Axes, groups: Sequence[Group], key: str, title: str, y_label: str, reference: str | None
) -> bool:
    """One panel of Fig. 3: each group's curve of ``key`` (``shift_key``) and the reference's
    maximum as a dashed line; returns whether that line was drawn."""
    for index, group in enumerate(groups):
        if has_curve(group, shift_key(group, key)):
            _band(panel, group.curves[shift_key(group, key)], group.label, f"C{index % 10}")
    line = reference_line(groups, key, reference)
    if line is not None:
        panel.axhline(line[0], linestyle="--", color="black", linewidth=1, label=f"{line[1]} (max)")
    _finish(panel, title, y_label)
    return line is not None


def health_figure(groups: Sequence[Group], out: Path) -> tuple[list[str], list[str]]:
    """``health.png``: entropy, response length and gradient norm, three panels.

    Args:
        groups: all groups, in order.
        out: the output folder.

    Returns:
        ``(files written, notes)``; a panel no group has data for says "no data"; no file when all
        are empty.
    """
    name = "health.png"
    if not any(has_curve(group, key) for group in groups for key in HEALTH_KEYS):
        return [], [f"{name} not written: no run logged {', '.join(HEALTH_KEYS)}"]
    notes = []
    figure, axes = _new_figure(1, 3, 16, 4.5)
    for panel, (key, title, y_label) in zip(axes.flat, HEALTH_PANELS):
        drawn = [index for index, group in enumerate(groups) if has_curve(group, key)]
        for index in drawn:
            _band(panel, groups[index].curves[key], groups[index].label, f"C{index % 10}")
        if not drawn:
            panel.text(0.5, 0.5, "no data", ha="center", va="center", transform=panel.transAxes)
            notes.append(f"{name}: no run logged {key}; its panel says 'no data'")
        _finish(panel, title, y_label)
    figure.suptitle(f"Training health ({_smoothing(groups, HEALTH_KEYS)})")
    return [_save(figure, out, name)], notes


def draw_figures(
    groups: Sequence[Group], out: Path, reference: str | None = None
) -> tuple[list[str], list[str]]:
    """Draw every figure the groups have data for into ``out`` (which must exist).

    Args:
        groups: the groups with their curves (``summarize_group`` fills them).
        out: the output folder.
        reference: the label of the reference group (its maximum is the dashed line of Fig. 3, its
            final training accuracy Fig. 1's target); None: the default (``reference_group``).

    Returns:
        ``(PNG file names written, notes about what was left out)``.
    """
    percent = {  # key -> (file, title, y label) of the one-metric figures, drawn in percent
        keys.ACCURACY: ("fig1_accuracy.png", "Training-batch accuracy", "training accuracy (%)"),
        keys.VAL_ACCURACY: ("fig2_heldout.png", "Held-out accuracy", "held-out accuracy (%)"),
        REJECT_KEY: ("fig5_rejection.png", "Token rejection rate", "rejected tokens (%)"),
    }
    drawn = [
        single_metric_figure(groups, key, out, *spec, 100.0, key == keys.ACCURACY, reference)
        for key, spec in percent.items()
    ]
    drawn.insert(2, shifts_figure(groups, out, reference))
    drawn.append(health_figure(groups, out))
    return [name for files, _ in drawn for name in files], [
        note for _, notes in drawn for note in notes
    ]
