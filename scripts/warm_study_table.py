"""docs/results.md's tables for the warm-started regime study, recomputed from the committed runs (docs/study/warm/).

    .venv/bin/python scripts/warm_study_table.py [docs/study/warm] [--runs NAME ...]

The first line names the runs the tables cover (``Runs in these tables (n): ...``): every finished run, or those
given with ``--runs``. The study's driver commits runs while the study goes on, so docs/results.md shows the
tables of the runs it names, and its test recomputes exactly those (``--runs`` with the page's list).

Arms are ``capo report``'s groups (objective, selector with its thresholds / shadow model / calibration, regime,
lr, starting policy; seeds are replicates). Per arm, mean ± SEM over seeds (SEM = sample std / sqrt(n)):

* training accuracy (``train/accuracy``, the paper's "MATH accuracy": the mean reward of the step's sampled
  completions) smoothed by a trailing window of 64 completions (the rule ``capo report`` draws Fig. 1 with):
  its first value (start) and its last (final);
* held-out accuracy (320 problems at temperature 0.6): the last validation (final) and each run's best (peak);
* sample efficiency as the paper defines it: the reference arm (conservative GRPO) reaches its final smoothed
  training accuracy at its final completions; "N×" = those completions / the completions the arm's mean curve
  needs to reach that value and hold it for 64 completions, with a percentile bootstrap interval over seeds (2,000
  draws of each arm's and the reference's seeds; a draw that never crosses counts 0×) and the share of draws that
  never cross; "never" when the mean curve does not;
* collapse: runs in which today's ``CollapseDetector`` (its default ``warn`` settings, replayed over the logged
  metrics) raises an alarm, and the signals;
* rejection: mean and peak over steps of the rate of rejected judged tokens (``select/token_reject_rate``; what a
  measuring selector would have rejected; steps of a calibration warm-up, which reject nothing, left out), and the
  same mean split by the sign of the token's advantage.

The stability frontier: for each method laddered over learning rates (2x, 3x, 5x the conservative rate at the
aggressive batch), the largest rate at which no seed collapsed, and none at a smaller rate either. A collapse here
is an alarm of a policy-health signal (reward drop, entropy collapse or rise, answers at the length cap or
vanishing, gradient spike, KL); ``reject_spike`` (the selector rejecting most tokens) judges the selector, not
the policy, and is left out of the frontier (it still shows in the alarm column). The provenance check lists arms
whose runs span more than one commit or starting policy (they must be rerun).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from capo_lightning import keys
from capo_lightning.callbacks.collapse_signals import replay
from capo_lightning.report.curves import Window
from capo_lightning.report.efficiency import sample_efficiency
from capo_lightning.report.groups import group_runs
from capo_lightning.report.runs import Run, load_run

ACCURACY = keys.ACCURACY
WINDOW, SUSTAIN = Window(64), 64.0
REGIME_LR = {"aggressive_lr2x": 2, "aggressive_lr3x": 3, "aggressive": 5}
NOT_COLLAPSE = ("reject_spike",)  # an alarm about the selector, not the policy


def mean_sem(values: list[float]) -> str:
    """``0.412 ± 0.031`` (n = 1: the value alone; none: ``-``)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def smoothed(run: Run) -> list[float]:
    """The run's training accuracy under the 64-completion trailing window."""
    from capo_lightning.report.efficiency import mean_curve

    return list(mean_curve([run.series(ACCURACY)], WINDOW)[1])


def alarms(run: Run) -> list[str]:
    """The signals the default collapse detector raises over the run's training steps, in order."""
    return [reading.signal for _, reading in replay([row for row in run.rows if keys.REWARD_MEAN in row])]


def rejection(run: Run, key: str) -> list[float]:
    """Per-step values of a ``select/*`` rate, calibration warm-up steps left out."""
    return [
        row[key]
        for row in run.rows
        if key in row and row.get(keys.CALIBRATING, 0.0) == 0.0 and not math.isnan(row[key])
    ]


def is_reference(label: str) -> bool:
    """Conservative GRPO: the arm whose final training accuracy defines the sample-efficiency target."""
    name, regime = label.split(" · ", 1)
    return name.startswith("GRPO (monitor") and regime.split(",")[0] == "conservative"


def held_out(run: Run) -> list[float]:
    return list(run.series(keys.VAL_ACCURACY)[1])


def efficiency_cell(runs: list[Run], reference: list[Run]) -> str:
    found = sample_efficiency([r.series(ACCURACY) for r in runs], [r.series(ACCURACY) for r in reference],
                              WINDOW, SUSTAIN)  # fmt: skip
    low, high = found.interval
    never = f", never in {found.never_fraction:.0%} of draws" if found.never_fraction else ""
    if found.ratio is None:
        return f"never ({low:.2f}–{high:.2f}×{never})"
    return f"{found.ratio:.2f}× at {found.crossing:.0f} ({low:.2f}–{high:.2f}×{never})"


def arm_row(label: str, runs: list[Run], reference: list[Run]) -> str:
    curves = [smoothed(r) for r in runs]
    flagged = [alarms(r) for r in runs]
    signals = sorted({signal for found in flagged for signal in found})
    collapsed = f"{sum(map(bool, flagged))}/{len(runs)}" + (f" ({', '.join(signals)})" if signals else "")
    rates = [rejection(r, keys.TOKEN_REJECT_RATE) for r in runs]
    mean_rate = mean_sem([statistics.fmean(r) for r in rates if r])
    peak_rate = mean_sem([max(r) for r in rates if r])
    split = [mean_sem([statistics.fmean(v) for v in (rejection(r, key) for r in runs) if v]) for key in (
        keys.REJECT_RATE_POS_ADV, keys.REJECT_RATE_NEG_ADV)]  # fmt: skip
    cells = [
        label, ",".join(str(r.seed) for r in runs),
        mean_sem([c[0] for c in curves if c]), mean_sem([c[-1] for c in curves if c]),
        mean_sem([h[-1] for h in map(held_out, runs) if h]), mean_sem([max(h) for h in map(held_out, runs) if h]),
        efficiency_cell(runs, reference) if reference else "-", collapsed, mean_rate, peak_rate, *split,
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| arm | seeds | training acc., start | training acc., final | held-out acc., final | held-out acc., peak "
    "| sample efficiency vs conservative GRPO (95% interval) | runs with a collapse alarm | rejection rate, mean "
    "| rejection rate, peak | rejection, A > 0 | rejection, A < 0 |"
)


def frontier(groups: dict[str, list[Run]]) -> list[str]:
    """The largest ladder rate at which no seed of a method raised an alarm, per laddered method."""
    by_method: dict[str, dict[int, list[Run]]] = defaultdict(dict)
    for label, runs in groups.items():
        name, regime = label.split(" · ", 1)
        regime = regime.split(",")[0]
        if regime in REGIME_LR:
            by_method[name][REGIME_LR[regime]] = runs
    lines = ["| method | " + " | ".join(f"{k}× lr: runs that collapsed" for k in (2, 3, 5)) + " | stability frontier |",
             "|---|---|---|---|---|"]  # fmt: skip
    for method, rungs in sorted(by_method.items()):
        if len(rungs) < 2:
            continue
        cells, stable = [], []
        for k in (2, 3, 5):
            runs = rungs.get(k)
            if runs is None:
                cells.append("not run")
                continue
            hit = sum(any(signal not in NOT_COLLAPSE for signal in alarms(r)) for r in runs)
            cells.append(f"{hit}/{len(runs)}")
            stable.append((k, hit == 0))
        below = [k for k, ok in stable if ok and all(ok2 for k2, ok2 in stable if k2 < k)]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {f'{max(below)}×' if below else 'below 2×'} |")
    return lines


# Commits that run the same training code as another: the study's pinned commit with a fix outside the training
# path (tag warm-study-code: 3b7b2b3 + report/versions.write_rows' NaN fix, which only the driver's log copy uses).
SAME_TRAINING_CODE = {"94b1e8c2ba8b3c48035bfaa0c4e8d9035b6119df": "3b7b2b3e26703c0c681346ad4fbbb7f78cb39119"}


def provenance(folder: Path, groups: dict[str, list[Run]]) -> list[str]:
    """Arms whose runs span several commits (of different training code) or starting policies."""
    notes = []
    for label, runs in groups.items():
        found = [json.loads((Path(r.path) / "provenance.json").read_text()) for r in runs
                 if (Path(r.path) / "provenance.json").exists()]  # fmt: skip
        for p in found:
            p["commit"] = SAME_TRAINING_CODE.get(p["commit"], p["commit"])
        for key in ("commit", "policy_sha256"):
            values = {p[key] for p in found}
            if len(values) > 1:
                notes.append(f"{label}: runs span {len(values)} values of {key}; rerun the arm on one")
    return notes


RUNS_LINE = "Runs in these tables"


def table(folder: Path, names: list[str] | None = None) -> str:
    """The markdown tables of the finished runs under ``folder`` (those in ``names``, if given)."""
    run_dirs = sorted(p for p in folder.iterdir() if (p / "provenance.json").exists())
    if names is not None:
        missing = sorted(set(names) - {p.name for p in run_dirs})
        if missing:
            raise SystemExit(f"no finished run {', '.join(missing)} under {folder}")
        run_dirs = [p for p in run_dirs if p.name in names]
    runs = [load_run(p) for p in run_dirs]
    found, _ = group_runs(runs)
    groups = {group.label: group.runs for group in found}
    reference = next((runs for label, runs in groups.items() if is_reference(label)), [])
    lines = [f"{RUNS_LINE} ({len(run_dirs)}): {', '.join(p.name for p in run_dirs)}.", "", HEADER, "|" + "---|" * 12]
    order = sorted(groups, key=lambda label: (label.split(" · ", 1)[1], label))
    lines += [arm_row(label, groups[label], reference) for label in order]
    ladder = frontier(groups)
    if len(ladder) > 2:
        lines += ["", *ladder]
    notes = provenance(folder, groups)
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def named_runs(page: str) -> list[str] | None:
    """The runs a page's tables cover, from its ``Runs in these tables (n): a, b.`` line (None: no such line)."""
    for line in page.splitlines():
        if line.startswith(RUNS_LINE):
            return [name.strip() for name in line.split(":", 1)[1].strip().rstrip(".").split(",")]
    return None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="docs/study/warm", type=Path)
    parser.add_argument("--runs", nargs="+", help="only these finished runs (folder names)")
    args = parser.parse_args(argv)
    print(table(args.folder, args.runs))


if __name__ == "__main__":
    main(sys.argv[1:])
