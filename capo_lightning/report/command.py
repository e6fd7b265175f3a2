"""``capo report RUN_DIR... --out DIR``: read the runs, group them, write ``summary.json`` and the
figures."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capo_lightning import keys
from capo_lightning.report.efficiency import SUSTAIN, sample_efficiency
from capo_lightning.report.figures import draw_figures
from capo_lightning.report.groups import Group, group_runs, plain, summarize_group
from capo_lightning.report.reference import reference_group
from capo_lightning.report.runs import Run, find_metrics, load_run
from capo_lightning.report.smoothing import EMA, Rule, Window

EFFICIENCY_KEY = keys.ACCURACY  # the metric whose sample efficiency summary.json reports (Fig. 1's)


def _label_overrides(labels: Mapping[str, str], runs: list[Run]) -> dict[int, str]:
    """``--label RUN_DIR=NAME`` pairs as run index -> NAME, matched on the metrics.csv each RUN_DIR
    names."""
    overrides = {}
    where = {(run.path / "metrics.csv").resolve(): index for index, run in enumerate(runs)}
    for run_dir, name in labels.items():
        target = find_metrics(run_dir).resolve()
        if target not in where:
            given = ", ".join(str(run.path) for run in runs)
            raise ValueError(
                f"--label {run_dir}={name}: {run_dir} is not one of the runs given ({given}); "
                "pass the same RUN_DIR as a positional argument too"
            )
        overrides[where[target]] = name
    return overrides


def _load_runs(run_dirs: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """Each RUN_DIR's run, a run named twice (overlapping globs) only once."""
    runs, notes, seen = [], [], set()
    for run_dir in run_dirs:
        run = load_run(run_dir)
        resolved = run.path.resolve()
        if resolved in seen:
            notes.append(f"{run_dir} names the run {run.path} a second time; counted once")
            continue
        seen.add(resolved)
        runs.append(run)
        notes += run.notes
    return runs, notes


def _override(ema: float | None, window: float | None) -> Rule | None:
    """The rule ``--ema`` or ``--window`` sets for every metric; None: the per-metric defaults."""
    if ema is not None and window is not None:
        raise ValueError(
            "--ema and --window are mutually exclusive: give one smoothing rule for every metric"
        )
    if ema is not None and not 0.0 < ema <= 1.0:
        raise ValueError(f"--ema must be in (0, 1] (1 = no smoothing), got {ema}")
    if window is not None and not (math.isfinite(window) and window > 0):
        raise ValueError(f"--window must be a positive number of completions, got {window}")
    return EMA(ema) if ema is not None else Window(window) if window is not None else None


def _efficiencies(
    groups: Sequence[Group], reference: str | None, key: str = EFFICIENCY_KEY
) -> dict[str, dict]:
    """Group label -> ``sample_efficiency`` of its ``key`` against the reference group
    (``reference_group``), with the rule the group's curve used and ``SUSTAIN``; empty when no
    reference group has the curve."""

    def has(group: Group) -> bool:
        return key in group.curves and group.curves[key].x.size > 0

    chosen = reference_group(groups, reference, has)
    if chosen is None:
        return {}
    reference_series = [
        series for series in (run.series(key) for run in chosen.runs) if len(series[0])
    ]
    entries = {}
    for group in groups:
        if has(group):
            series = [
                series for series in (run.series(key) for run in group.runs) if len(series[0])
            ]
            found = sample_efficiency(series, reference_series, group.curves[key].rule, SUSTAIN)
            entries[group.label] = {key: {"reference": chosen.label, **found.as_dict()}}
    return entries


def _summaries(
    groups: Sequence[Group], rule: Rule | None, reference: str | None
) -> tuple[dict[str, dict], list[str]]:
    """Group label -> its ``summarize_group`` entry with its ``efficiency`` added, and the notes."""
    entries, notes = {}, []
    for group in groups:
        entries[group.label], summary_notes = summarize_group(group, rule)
        notes += summary_notes
    for label, efficiency in _efficiencies(groups, reference).items():
        entries[label]["efficiency"] = efficiency
    return entries, notes


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    ema: float | None = None,
    reference: str | None = None,
    labels: Mapping[str, str] | None = None,
    window: float | None = None,
) -> dict[str, Any]:
    """Read runs, group them, aggregate their curves and write ``summary.json`` and the PNG figures.

    ``summary.json`` is
    ``{"groups": {label: {"runs", "seeds", "curves", "final", "best", "efficiency"}},
    "figures": [...], "notes": [...]}``; see ``summarize_group`` for the numbers, ``draw_figures``
    for the figures. ``efficiency`` is ``{"train/accuracy": {"reference", "target",
    "reference_completions", "crossing", "ratio", "interval", "never_fraction", ...}}``
    (``efficiency.sample_efficiency`` against the reference group, with the curve's smoothing and a
    crossing held ``SUSTAIN`` completions; absent without a reference group or curve). NaN and
    infinities are written as null.

    Args:
        run_dirs: run roots, ``version_N`` folders or ``metrics.csv`` paths; one run each.
        out: the output folder (created if missing).
        ema: one EMA alpha in (0, 1] for every metric (1 = no smoothing); None: the defaults
            (``DEFAULT_SMOOTHING``: a trailing window of 64 completions for training accuracy and
            reward, EMA 0.35 for the shifts, rejection and health curves, none for held-out
            accuracy).
        reference: the label of the reference group: its maximum is Fig. 3's dashed line, its final
            training accuracy the efficiency target; None: the first group whose selector does not
            enforce and that logged the curve.
        labels: RUN_DIR -> group label, overriding the automatic one (runs with the same label form
            a group).
        window: one trailing window in completions (> 0) for every metric instead; not with ``ema``.

    Returns:
        The summary as written to ``out/summary.json``.

    Raises:
        FileNotFoundError: a RUN_DIR holds no metrics.csv.
        ValueError: no RUN_DIR, an alpha outside (0, 1], a window <= 0, both ``ema`` and ``window``,
            an unknown reference label, or a label for a run not given.
    """
    if not run_dirs:
        raise ValueError(
            "capo report needs at least one RUN_DIR (a run's trainer.default_root_dir)"
        )
    rule = _override(ema, window)
    runs, notes = _load_runs(run_dirs)
    groups, group_notes = group_runs(runs, _label_overrides(labels or {}, runs))
    notes += group_notes
    if reference is not None and reference not in [group.label for group in groups]:
        known = "; ".join(repr(group.label) for group in groups)
        raise ValueError(f"--reference {reference!r} is not a group label; the groups are: {known}")
    entries, summary_notes = _summaries(groups, rule, reference)
    notes += summary_notes
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, figure_notes = draw_figures(groups, out_dir, reference)
    summary = plain({"groups": entries, "figures": figures, "notes": notes + figure_notes})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capo report",
        description="Draw the paper's figures (training and held-out accuracy, curvature shifts, "
        "rejection rate, health) from the CSV logs of `capo fit` runs, seeds averaged as mean ± "
        "SEM, and write summary.json.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run's trainer.default_root_dir (its highest logs/version_N is taken), a version_N "
        "folder or a metrics.csv; several runs of one configuration are seeds",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="folder for the PNG files and summary.json (created if missing)",
    )
    smoothing = parser.add_mutually_exclusive_group()
    smoothing.add_argument(
        "--ema",
        type=float,
        default=None,
        help="EMA alpha for every curve, in (0, 1]; 1 = no smoothing (default: a trailing window "
        "of 64 completions for training accuracy and reward, EMA 0.35 for the shifts, rejection "
        "and health)",
    )
    smoothing.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="W",
        help="a trailing window of W completions (> 0) for every curve instead, each step weighted "
        "by its completions; not with --ema",
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="LABEL",
        help="reference group: its maximum is the dashed line of fig3_shifts.png, its final "
        "training accuracy the target of fig1_accuracy.png and of the sample efficiency in "
        "summary.json (default: the first group whose selector does not mask)",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="RUN_DIR=NAME",
        help="group label for one run instead of the automatic one; repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """``capo report RUN_DIR [RUN_DIR ...] --out DIR [--ema A | --window W] [--reference LABEL]
    [--label DIR=NAME]``.

    Prints the files written and the notes. Errors (no metrics.csv, bad option) exit with status 2
    and a message saying what is wrong.

    Args:
        argv: the arguments after ``report``; None reads ``sys.argv[1:]``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    labels = {}
    for pair in args.label:
        run_dir, sep, name = pair.rpartition("=")
        if not sep or not run_dir or not name:
            parser.error(f"--label {pair!r}: expected RUN_DIR=NAME, e.g. --label runs/seed0=GRPO")
        labels[run_dir] = name
    try:
        summary = build_report(
            args.run_dirs,
            args.out,
            ema=args.ema,
            reference=args.reference,
            labels=labels,
            window=args.window,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    out = Path(args.out)
    print(
        f"capo report: {len(summary['groups'])} group(s) from {len(args.run_dirs)} RUN_DIR(s); "
        "wrote:"
    )
    for name in [*summary["figures"], "summary.json"]:
        print(f"  {out / name}")
    for note in summary["notes"]:
        print(f"note: {note}")
