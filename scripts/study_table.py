"""docs/results.md's table, recomputed from the committed run logs of the regime study (docs/study/regimes/).

Per arm (regime + objective + selector; seeds are replicates): final and peak held-out accuracy (mean ± SEM
over seeds), completions needed to reach the conservative GRPO arm's mean final held-out accuracy (first
validation at or above it; the mean over the seeds that reached it, and how many did), runs in which
today's collapse detector raises an alarm (its default ``warn`` settings replayed over the logged metrics, so
runs logged before a detector change are judged alike) with the signals, and the mean token rejection rate
(would-be for measuring selectors).
    .venv/bin/python scripts/study_table.py [docs/study/regimes]
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from capo_lightning import keys
from capo_lightning.callbacks.collapse_signals import replay
from capo_lightning.report.runs import Run, load_run


def arm_of(run: Run) -> str:
    """``aggressive · GRPO + CAPO`` (``(monitor)`` marks a measuring selector)."""
    selector = "" if run.selector in ("none", "KeepAll") else f" + {run.selector}"
    if selector and not run.enforces:
        selector = " (monitor)"
    return f"{run.regime} · {run.objective}{selector}"


def mean_sem(values: list[float]) -> str:
    """``0.412 ± 0.031`` (SEM = sample std / sqrt(n); n = 1 has no ±)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def held_out(run: Run) -> tuple[list[float], list[float]]:
    """(completions, val/accuracy) at each validation of the run."""
    x, y = run.series(keys.VAL_ACCURACY)
    return list(map(float, x)), list(map(float, y))


def completions_to(run: Run, target: float) -> float | None:
    """Completions at the first validation with accuracy >= target (None when never)."""
    for x, y in zip(*held_out(run)):
        if y >= target - 1e-12:
            return x
    return None


def alarms(run: Run) -> list[str]:
    """The signals the default collapse detector raises over the run's training steps, in order."""
    return [reading.signal for _, reading in replay([row for row in run.rows if keys.REWARD_MEAN in row])]


def rows_for(runs_by_arm: dict[str, list[Run]], target: float | None) -> list[str]:
    lines = [
        "| arm | seeds | final held-out acc. | peak held-out acc. | completions to conservative GRPO's final "
        "| runs with a collapse alarm | mean rejection rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, runs in sorted(runs_by_arm.items()):
        finals = [held_out(r)[1][-1] for r in runs if held_out(r)[1]]
        peaks = [max(held_out(r)[1]) for r in runs if held_out(r)[1]]
        reached = [c for c in (completions_to(r, target) for r in runs) if c is not None] if target else []
        to_target = f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(runs)} runs)" if reached else "never"
        flagged = [alarms(r) for r in runs]
        signals = sorted({signal for found in flagged for signal in found})
        collapsed = f"{sum(map(bool, flagged))}/{len(runs)}" + (f" ({', '.join(signals)})" if signals else "")
        rates = [statistics.fmean(r.series(keys.TOKEN_REJECT_RATE)[1]) for r in runs if r.has(keys.TOKEN_REJECT_RATE)]
        seeds = ",".join(str(r.seed) for r in runs)
        lines.append(
            f"| {arm} | {seeds} | {mean_sem(finals)} | {mean_sem(peaks)} | {to_target} | {collapsed} "
            f"| {mean_sem(rates)} |"
        )
    return lines


def table(folder: Path) -> str:
    """The markdown table for every run folder under ``folder``."""
    runs_by_arm: dict[str, list[Run]] = defaultdict(list)
    for run_dir in sorted(p for p in folder.iterdir() if (p / "metrics.csv").exists()):
        run = load_run(run_dir)
        runs_by_arm[arm_of(run)].append(run)
    conservative = runs_by_arm.get("conservative · GRPO (monitor)", [])
    finals = [held_out(r)[1][-1] for r in conservative if held_out(r)[1]]
    target = statistics.fmean(finals) if finals else None
    head = f"Target (conservative GRPO's mean final held-out accuracy): {target:.3f}\n\n" if target else ""
    return head + "\n".join(rows_for(runs_by_arm, target))


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/study/regimes")))
