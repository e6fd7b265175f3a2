"""A resumed run's versions are joined by the rule of capo_lightning.report.versions, worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

from capo_lightning.report.runs import load_run, read_rows
from capo_lightning.report.versions import with_earlier_versions, write_rows


def _train(step: int, reward: float) -> dict[str, float]:
    return {"step": float(step), "train/reward_mean": reward, "train/completions_total": 16.0 * step}


def test_a_resumed_version_continues_and_replaces_the_redone_steps(tmp_path: Path) -> None:
    logs = tmp_path / "run" / "logs"
    # version 0: validation at step 0, steps 1..6, then killed; the checkpoint was at step 4
    v0 = [{"step": 0.0, "val/accuracy": 0.1}] + [_train(s, 0.1 * s) for s in range(1, 7)]
    # version 1 resumed from step 4: redoes 5 and 6 (other values: other samples), goes on to 8, validates at 8
    v1 = [_train(s, 1.0 + s) for s in range(5, 9)] + [{"step": 8.0, "val/accuracy": 0.6}]
    write_rows(v0, logs / "version_0" / "metrics.csv")
    write_rows(v1, logs / "version_1" / "metrics.csv")
    rows, paths = with_earlier_versions(logs / "version_1" / "metrics.csv", read_rows)
    assert [p.parent.name for p in paths] == ["version_0", "version_1"]
    assert rows == v0[:5] + v1  # v0's steps 0..4, then all of v1 (v0's 5 and 6 were redone)
    run = load_run(tmp_path / "run")
    assert [r.get("train/reward_mean") for r in run.rows if r["step"] in (4.0, 5.0)] == [0.4, 6.0]
    assert any("joined" in note for note in run.notes)


def test_a_run_restarted_from_scratch_replaces_the_earlier_versions(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write_rows([_train(s, 0.5) for s in range(1, 4)], logs / "version_0" / "metrics.csv")
    fresh = [{"step": 0.0, "val/accuracy": 0.2}, _train(1, 0.9)]
    write_rows(fresh, logs / "version_1" / "metrics.csv")
    assert with_earlier_versions(logs / "version_1" / "metrics.csv", read_rows)[0] == fresh
    # an explicitly named earlier version stays alone, and a metrics.csv outside version folders is read as is
    assert len(with_earlier_versions(logs / "version_0" / "metrics.csv", read_rows)[0]) == 3
    write_rows(fresh, tmp_path / "metrics.csv")
    assert with_earlier_versions(tmp_path / "metrics.csv", read_rows) == (fresh, [tmp_path / "metrics.csv"])


def test_folders_that_are_not_lightning_versions_are_left_out(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write_rows([_train(1, 0.5), _train(2, 0.5)], logs / "version_old" / "metrics.csv")  # a user's backup copy
    resumed = [_train(3, 0.7)]
    write_rows(resumed, logs / "version_1" / "metrics.csv")
    rows, paths = with_earlier_versions(logs / "version_1" / "metrics.csv", read_rows)
    assert rows == resumed and [p.parent.name for p in paths] == ["version_1"]


def test_non_finite_values_round_trip(tmp_path: Path) -> None:
    """A calibrating selector logs NaN thresholds (select/delta_f); joining a run's versions must keep them."""
    rows = [
        {"step": 1.0, "select/delta_f": float("nan"), "objective/grad_norm": float("inf"), "x": -float("inf")},
        {"step": 2.0, "select/delta_f": 3.0e-4, "objective/grad_norm": 1.5, "x": 7.0},
    ]
    path = tmp_path / "metrics.csv"
    write_rows(rows, path)
    assert path.read_text().splitlines()[1] == "1,nan,inf,-inf"
    back = read_rows(path)
    assert back[1] == rows[1] and back[0]["step"] == 1.0 and back[0]["x"] == -float("inf")
    assert math.isnan(back[0]["select/delta_f"]) and back[0]["objective/grad_norm"] == float("inf")


def test_a_step_relogged_from_its_checkpoint_keeps_the_validation_that_followed_it(tmp_path: Path) -> None:
    """DurableLog: the checkpoint of step 2 was saved before step 2 was logged, so the resumed version logs step 2's
    training row again, first; the validation at step 2 ran after the checkpoint and is not redone: version 0's
    validation row at step 2 stays, its training row at step 2 and everything later are replaced."""
    logs = tmp_path / "logs"
    v0 = [_train(1, 0.1), _train(2, 0.2), {"step": 2.0, "val/accuracy": 0.3}, _train(3, 0.3)]
    v1 = [_train(2, 0.2), _train(3, 0.35), _train(4, 0.4), {"step": 4.0, "val/accuracy": 0.5}]
    write_rows(v0, logs / "version_0" / "metrics.csv")
    write_rows(v1, logs / "version_1" / "metrics.csv")
    rows, _ = with_earlier_versions(logs / "version_1" / "metrics.csv", read_rows)
    assert rows == [v0[0], v0[2]] + v1
