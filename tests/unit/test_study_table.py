"""scripts/study_table.py (docs/results.md's table) agrees with `capo report`'s summary on the same real runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from capo_lightning.report.runs import load_run

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("study_table", ROOT / "scripts/study_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_matches_the_report_summary_of_the_quickstart_study() -> None:
    study = ROOT / "docs/study/quickstart"
    text = _script().table(study)
    summary = json.loads((study / "report/summary.json").read_text())
    for label, group in summary["groups"].items():
        final, best = group["final"]["val/accuracy"], group["best"]["val/accuracy"]
        row = next(line for line in text.splitlines() if line.startswith("|") and _arm(label) in line)
        assert f"{final['mean']:.3f} ± {final['sem']:.3f}" in row, row
        assert f"{best['mean']:.3f} ± {best['sem']:.3f}" in row, row
        assert "| 0,1 |" in row


def _arm(label: str) -> str:
    """The report's ``GRPO + CAPO · lr 2e-05, 32/step`` as the table's ``lr 2e-05, 32/step · GRPO + CAPO``."""
    name, regime = label.split(" · ")
    return f"{regime} · {name}"


def test_collapse_column_replays_todays_detector_over_the_logged_metrics() -> None:
    # aggressive CAPO (paper thresholds) ran before the detector had an entropy_rise signal: no alarm was logged
    run = load_run(ROOT / "docs/study/regimes/aggressive_capo_s0")
    assert not any(row.get("collapse/alarm") == 1.0 for row in run.rows)
    assert _script().alarms(run) == ["entropy_rise"]
    assert _script().alarms(load_run(ROOT / "docs/study/regimes/conservative_grpo_s0")) == []
