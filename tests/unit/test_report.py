"""``capo report``: runs written here as the CSV logger and LightningCLI write them, numbers checked by hand.

Run: ``pytest tests/unit/test_report.py``. Every expected number is computed in this file from the values the
test wrote (statistics and a written-out EMA), never taken from the report's own output.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from capo_lightning.report import build_report, main
from capo_lightning.report.curves import EMA, Window, aggregate
from capo_lightning.report.efficiency import SUSTAIN, sample_efficiency
from capo_lightning.report.figures import draw_target, reference_line
from capo_lightning.report.groups import group_runs, summarize_group
from capo_lightning.report.labels import policy_name
from capo_lightning.report.runs import Calibration, completions_at_step, load_run

STEPS = (1, 2, 3, 4, 5)
PER_STEP = 32  # prompts_per_step 4 x group_size 8
VAL_STEPS = (0, 3, 5)
SHIFTS = ("token_fisher_mean", "global_fisher", "token_hessian_mean", "global_hessian")
CAPO = {"class_path": "capo_lightning.selection.CAPOSelector", "init_args": {"enforce": True, "delta_f": 1.0e-4}}
MONITOR = {"class_path": "capo_lightning.selection.CAPOSelector", "init_args": {"enforce": False}}
BASE_LABEL = "GRPO · lr 2e-05, 32/step"
CAPO_LABEL = "GRPO + CAPO · lr 2e-05, 32/step"


def known_values(group: int, seed: int, selector: dict | None) -> dict[str, dict[int, float]]:
    """metric -> step -> value of one run: distinct, reproducible numbers (rounded: exact in the CSV)."""
    rng = np.random.default_rng(100 * group + seed)
    values = {
        "train/accuracy": {s: round(float(rng.uniform(0, 1)), 4) for s in STEPS},
        "train/reward_mean": {s: round(float(rng.uniform(0, 1)), 4) for s in STEPS},
        "objective/entropy": {s: round(float(rng.uniform(0.5, 2)), 4) for s in STEPS},
        "rollout/response_length_mean": {s: round(float(rng.uniform(10, 40)), 2) for s in STEPS},
        "objective/grad_norm": {s: round(float(rng.uniform(0.1, 3)), 4) for s in STEPS},
        "val/accuracy": {s: round(float(rng.uniform(0, 1)), 4) for s in VAL_STEPS},
    }
    if selector is not None:
        for name in SHIFTS:
            values[f"curvature/{name}"] = {s: round(float(rng.uniform(0, 0.01)), 6) for s in STEPS}
            values[f"curvature/masked_{name}"] = {s: round(float(rng.uniform(0, 0.01)), 6) for s in STEPS}
        values["select/token_reject_rate"] = {s: round(float(rng.uniform(0, 0.1)), 4) for s in STEPS}
    return values


def write_run(
    folder: Path, values: dict[str, dict[int, float]], seed: int, selector: dict | None, lr: float = 2e-5
) -> Path:
    """metrics.csv as Lightning's CSVLogger writes it (val rows separate, empty cells) and config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    train_keys = [key for key in values if not key.startswith("val/")]
    header = ["epoch", *sorted([*values, "train/completions_total", "val/arithmetic/accuracy"]), "step"]
    rows = [{"epoch": 0, "step": 0, "val/accuracy": values["val/accuracy"][0]}]
    for step in STEPS:
        row = {"epoch": 0, "step": step, "train/completions_total": float(PER_STEP * step)}
        rows.append(row | {key: values[key][step] for key in train_keys})
        if step in values["val/accuracy"]:
            val = values["val/accuracy"][step]
            rows.append({"epoch": 0, "step": step, "val/accuracy": val, "val/arithmetic/accuracy": val})
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    config = {
        "seed_everything": seed,
        "trainer": {"max_steps": len(STEPS)},
        "model": {
            "objective": {"class_path": "capo_lightning.objectives.GRPO", "init_args": {"beta": 0.0}},
            "selector": selector,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
        },
        "data": {"prompts_per_step": 4, "group_size": 8},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def hand_ema(values: list[float], alpha: float) -> list[float]:
    smoothed: list[float] = []
    for value in values:
        smoothed.append(value if not smoothed else alpha * value + (1 - alpha) * smoothed[-1])
    return smoothed


def hand_mean_sem(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def hand_window(x: list[float], y: list[float], width: float) -> list[float]:
    """Trailing window written out: at x_i, sum n_j y_j / sum n_j over j <= i with x_j > x_i - width."""
    sizes = [x[0]] + [b - a for a, b in zip(x, x[1:])]
    smoothed = []
    for i in range(len(x)):
        inside = [j for j in range(i + 1) if x[j] > x[i] - width]
        smoothed.append(sum(sizes[j] * y[j] for j in inside) / sum(sizes[j] for j in inside))
    return smoothed


@pytest.fixture
def two_groups(tmp_path: Path) -> tuple[list[Path], dict[str, list[dict[str, dict[int, float]]]]]:
    """GRPO without a selector and GRPO + CAPO (enforcing), three seeds each, as run roots."""
    dirs, truth = [], {BASE_LABEL: [], CAPO_LABEL: []}
    for group, (label, selector) in enumerate(((BASE_LABEL, None), (CAPO_LABEL, CAPO))):
        for seed in range(3):
            values = known_values(group, seed, selector)
            root = tmp_path / "runs" / f"g{group}_s{seed}"
            write_run(root / "logs" / "version_0", values, seed, selector)
            dirs.append(root)
            truth[label].append(values)
    return dirs, truth


def test_groups_labels_seeds_and_val_x_axis(two_groups, tmp_path: Path) -> None:
    dirs, truth = two_groups
    summary = build_report(dirs, tmp_path / "out", ema=1.0)
    assert list(summary["groups"]) == [BASE_LABEL, CAPO_LABEL]
    for group in summary["groups"].values():
        assert group["seeds"] == [0, 1, 2]
        assert len(group["runs"]) == 3 and all(run.endswith("version_0") for run in group["runs"])
    # validation rows hold no completions: step 0 -> 0, step s -> the training row's 32 s
    val = summary["groups"][BASE_LABEL]["curves"]["val/accuracy"]
    assert val["x"] == [0.0, 3.0 * PER_STEP, 5.0 * PER_STEP]
    assert summary["groups"][BASE_LABEL]["curves"]["train/accuracy"]["x"] == [float(PER_STEP * s) for s in STEPS]
    # only the CAPO runs logged shifts and rejection
    assert "curvature/masked_global_fisher" in summary["groups"][CAPO_LABEL]["curves"]
    assert not any(key.startswith(("curvature/", "select/")) for key in summary["groups"][BASE_LABEL]["curves"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


@pytest.mark.parametrize("ema", [1.0, None])
def test_curves_are_mean_and_sem_of_smoothed_seeds(two_groups, tmp_path: Path, ema: float | None) -> None:
    dirs, truth = two_groups
    summary = build_report(dirs, tmp_path / "out", ema=ema)
    # training accuracy's default is a trailing window of 64 completions (None here): at 32 per step, the mean of
    # the step and the one before it (the first step alone)
    defaults = {"train/accuracy": None, "val/accuracy": 1.0, "curvature/masked_token_hessian_mean": 0.35}
    for label, key in (
        (BASE_LABEL, "train/accuracy"),
        (CAPO_LABEL, "val/accuracy"),
        (CAPO_LABEL, "curvature/masked_token_hessian_mean"),
    ):
        alpha = defaults[key] if ema is None else ema
        curve = summary["groups"][label]["curves"][key]
        if alpha is None:
            ys = [[values[key][s] for s in sorted(values[key])] for values in truth[label]]
            per_run = [[y[0]] + [(a + b) / 2 for a, b in zip(y, y[1:])] for y in ys]
            assert curve["ema"] is None and curve["window"] == 64.0 and curve["n"] == 3
            assert curve["smoothing"] == "trailing window of 64 completions"
        else:
            per_run = [hand_ema([values[key][s] for s in sorted(values[key])], alpha) for values in truth[label]]
            assert curve["ema"] == alpha and curve["n"] == 3
            assert curve["window"] is None
        raw = [[values[key][s] for s in sorted(values[key])] for values in truth[label]]
        for point in range(len(per_run[0])):
            mean, sem = hand_mean_sem([run[point] for run in per_run])
            assert curve["mean"][point] == pytest.approx(mean, rel=1e-12)
            assert curve["sem"][point] == pytest.approx(sem, rel=1e-12)
            assert curve["raw_mean"][point] == pytest.approx(sum(run[point] for run in raw) / len(raw), rel=1e-12)


def test_final_and_best_use_raw_values(two_groups, tmp_path: Path) -> None:
    dirs, truth = two_groups
    summary = build_report(dirs, tmp_path / "out")  # smoothing must not touch final and best
    for label in (BASE_LABEL, CAPO_LABEL):
        for key in ("train/accuracy", "train/reward_mean", "val/accuracy"):
            lasts = [values[key][max(values[key])] for values in truth[label]]
            bests = [max(values[key].values()) for values in truth[label]]
            final, best = summary["groups"][label]["final"][key], summary["groups"][label]["best"][key]
            assert (final["mean"], final["sem"]) == pytest.approx(hand_mean_sem(lasts), rel=1e-12)
            assert (best["mean"], best["sem"]) == pytest.approx(hand_mean_sem(bests), rel=1e-12)
            assert final["n"] == best["n"] == 3
    rejects = [values["select/token_reject_rate"][5] for values in truth[CAPO_LABEL]]
    final = summary["groups"][CAPO_LABEL]["final"]["select/token_reject_rate"]
    assert final["mean"] == pytest.approx(statistics.mean(rejects), rel=1e-12)
    assert "select/token_reject_rate" not in summary["groups"][CAPO_LABEL]["best"]


def test_figures_are_written_and_baseline_missing_from_fig5_is_noted(two_groups, tmp_path: Path) -> None:
    dirs, _ = two_groups
    summary = build_report(dirs, tmp_path / "out")
    expected = ["fig1_accuracy.png", "fig2_heldout.png", "fig3_shifts.png", "fig5_rejection.png", "health.png"]
    assert sorted(summary["figures"]) == expected
    for name in expected:
        image = matplotlib.image.imread(tmp_path / "out" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.01  # not a blank canvas
    notes = " | ".join(summary["notes"])
    assert f"fig5_rejection.png: group '{BASE_LABEL}' has no select/token_reject_rate" in notes
    assert f"fig3_shifts.png: group '{BASE_LABEL}' logged no curvature shifts" in notes
    # no group without an enforcing selector logged shifts, so Fig. 3 has no reference line, and says so
    assert "no reference (max) line" in notes


def test_runs_without_selector_leave_out_shift_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path / "plain" / "logs" / "version_0", known_values(0, 0, None), 0, None)
    main([str(run), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "fig3_shifts.png" not in summary["figures"] and "fig5_rejection.png" not in summary["figures"]
    assert any(note.startswith("fig5_rejection.png not written") for note in summary["notes"])
    group = summary["groups"][BASE_LABEL]
    assert group["final"]["train/accuracy"]["sem"] == 0.0 and group["curves"]["train/accuracy"]["sem"] == [0.0] * 5
    printed = capsys.readouterr().out
    assert "fig1_accuracy.png" in printed and "summary.json" in printed and "note: fig5_rejection.png" in printed


def test_monitor_baseline_is_the_reference_line_and_capo_plots_masked_keys(tmp_path: Path) -> None:
    monitor = [known_values(2, seed, MONITOR) for seed in range(2)]
    capo = known_values(1, 0, CAPO)
    dirs = [write_run(tmp_path / f"m{seed}", values, seed, MONITOR) for seed, values in enumerate(monitor)]
    dirs.append(write_run(tmp_path / "c0", capo, 0, CAPO))
    runs = [load_run(path) for path in dirs]
    groups, _ = group_runs(runs)
    assert [group.label for group in groups] == ["GRPO (monitor) · lr 2e-05, 32/step", CAPO_LABEL]
    for group in groups:
        summarize_group(group, ema_alpha=1.0)
    value, label = reference_line(groups, "curvature/global_fisher", None)
    steps_mean = [statistics.mean(values["curvature/global_fisher"][s] for values in monitor) for s in STEPS]
    assert label == groups[0].label and value == pytest.approx(max(steps_mean), rel=1e-12)
    # naming the CAPO group as reference takes the curve it plots: the masked one
    value, label = reference_line(groups, "curvature/global_fisher", CAPO_LABEL)
    assert value == pytest.approx(max(capo["curvature/masked_global_fisher"].values()), rel=1e-12)


def test_root_takes_highest_version_and_labels_override(tmp_path: Path) -> None:
    root = tmp_path / "run"
    old, new = known_values(0, 0, None), known_values(0, 1, None)
    write_run(root / "logs" / "version_0", old, 0, None)
    write_run(root / "logs" / "version_1", new, 1, None)
    other = write_run(tmp_path / "other" / "logs" / "version_0", known_values(0, 2, None), 0, None)
    summary = build_report([root, other], tmp_path / "out", ema=1.0, labels={str(other): "mine"})
    assert list(summary["groups"]) == [BASE_LABEL, "mine"]
    assert summary["groups"][BASE_LABEL]["runs"] == [str(root / "logs" / "version_1")]
    expected = [new["train/accuracy"][s] for s in STEPS]
    assert summary["groups"][BASE_LABEL]["curves"]["train/accuracy"]["mean"] == pytest.approx(expected)
    # the two version folders passed explicitly are two runs (seeds 0 and 1) of one group
    summary = build_report([root / "logs" / "version_0", root / "logs" / "version_1"], tmp_path / "out2")
    assert summary["groups"][BASE_LABEL]["seeds"] == [0, 1]


def test_shared_seeds_noted_and_keepall_told_apart(tmp_path: Path) -> None:
    keep_all = {"class_path": "capo_lightning.selection.KeepAll"}
    dirs = [write_run(tmp_path / f"r{index}", known_values(0, index, None), 7, None) for index in range(2)]
    dirs.append(write_run(tmp_path / "k", known_values(0, 5, keep_all), 7, keep_all))
    groups, notes = group_runs([load_run(path) for path in dirs])
    assert [group.label for group in groups] == [f"{BASE_LABEL} [no selector]", f"{BASE_LABEL} [KeepAll]"]
    assert len(groups[0].runs) == 2 and not groups[1].enforces
    assert len(notes) == 1 and "2 runs share seed 7" in notes[0]


def test_alignment_keeps_only_shared_completions() -> None:
    first = (np.array([0.0, 32.0, 64.0, 96.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    second = (np.array([0.0, 64.0, 96.0]), np.array([5.0, 7.0, 9.0]))
    curve = aggregate([first, second], alpha=0.5)
    assert curve.x.tolist() == [0.0, 64.0, 96.0]
    smoothed_first = hand_ema([1.0, 2.0, 3.0, 4.0], 0.5)  # smoothed over all its points, then aligned
    smoothed_second = hand_ema([5.0, 7.0, 9.0], 0.5)
    for point, (a, b) in enumerate(zip([smoothed_first[i] for i in (0, 2, 3)], smoothed_second)):
        mean, sem = hand_mean_sem([a, b])
        assert curve.mean[point] == pytest.approx(mean) and curve.sem[point] == pytest.approx(sem)


def test_val_steps_between_logged_training_rows_are_interpolated() -> None:
    table = {10.0: 320.0, 20.0: 640.0}  # log_every_n_steps = 10
    assert completions_at_step(20.0, table) == 640.0
    assert completions_at_step(0.0, table) == 0.0
    assert completions_at_step(15.0, table) == pytest.approx(480.0)
    assert completions_at_step(25.0, table) == pytest.approx(800.0)


def test_bad_run_dirs_say_what_was_expected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no metrics.csv: expected .*logs/version_N/metrics.csv"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report([tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "has no metrics.csv" in capsys.readouterr().err
    run = write_run(tmp_path / "ok", known_values(0, 0, None), 0, None)
    with pytest.raises(ValueError, match="--reference 'nope' is not a group label"):
        build_report([run], tmp_path / "out", reference="nope")
    with pytest.raises(ValueError, match=r"--ema must be in \(0, 1\]"):
        build_report([run], tmp_path / "out", ema=0.0)


def test_capo_command_dispatches_report(two_groups, tmp_path: Path) -> None:
    from capo_lightning.commands.cli import main as capo_main

    dirs, truth = two_groups
    capo_main(["report", *map(str, dirs), "--out", str(tmp_path / "cli"), "--ema", "1", "--label", f"{dirs[0]}=A"])
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert list(summary["groups"]) == ["A", BASE_LABEL, CAPO_LABEL]
    assert summary["groups"]["A"]["curves"]["train/accuracy"]["mean"] == pytest.approx(
        [truth[BASE_LABEL][0]["train/accuracy"][s] for s in STEPS]
    )
    assert (tmp_path / "cli" / "fig3_shifts.png").is_file()


def test_report_imports_nothing_else_of_the_package() -> None:
    from tests.unit.test_layering import PACKAGE_ROOT, import_graph

    graph = import_graph(PACKAGE_ROOT)
    outside = [
        f"{name} -> {target}"
        for name, targets in sorted(graph.items())
        if name.startswith("capo_lightning.report")
        for target in sorted(targets)
        if not target.startswith("capo_lightning.report") and target != "capo_lightning.keys"  # the leaf of keys
    ]
    assert "capo_lightning.report.figures" in graph and outside == []
    assert "capo_lightning.report" in graph["capo_lightning.commands.cli"]  # the one way in: `capo report`


def test_run_with_only_its_step0_validation_is_reported_with_notes(tmp_path: Path) -> None:
    """A run still in its first step: the CSV holds the base model's validation row only."""
    folder = tmp_path / "early" / "logs" / "version_0"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("step,time/val_s,val/accuracy\n0,35.5,0.25\n")
    summary = build_report([tmp_path / "early"], tmp_path / "out")
    (group,) = summary["groups"].values()  # no config.yaml: grouped as unknown, with a note
    assert group["curves"]["val/accuracy"]["x"] == [0.0] and group["final"]["val/accuracy"]["mean"] == 0.25
    assert summary["figures"] == ["fig2_heldout.png"]
    notes = " | ".join(summary["notes"])
    assert "has no train/completions_total yet" in notes and "config.yaml is missing" in notes
    assert "fig1_accuracy.png not written" in notes and "health.png not written" in notes


def test_the_committed_study_redraws_to_its_committed_summary(tmp_path: Path) -> None:
    # README's figure: the four quickstart runs' real logs give back the numbers committed beside them
    study = Path(__file__).resolve().parents[2] / "docs/study/quickstart"
    runs = sorted(str(p) for p in study.glob("*_s*"))
    assert len(runs) == 4
    summary = build_report(runs, tmp_path / "out")
    committed = json.loads((study / "report/summary.json").read_text())
    assert sorted(summary["groups"]) == sorted(committed["groups"]) and len(summary["groups"]) == 2
    for label, group in summary["groups"].items():
        assert sorted(group["curves"]) == sorted(committed["groups"][label]["curves"])
        for key, was in committed["groups"][label]["curves"].items():
            now = group["curves"][key]
            if key in ("train/accuracy", "train/reward_mean"):  # smoothed by a 64-completion window since
                # summary.json was committed (then EMA 0.1): the raw numbers are the committed ones, and as the
                # runs share their x the mean of smoothed runs is the window over their raw mean
                assert (now["x"], now["n"], now["raw_mean"]) == (was["x"], was["n"], was["raw_mean"])
                assert now["mean"] == pytest.approx(hand_window(now["x"], now["raw_mean"], 64.0), rel=1e-12)
                assert now["window"] == 64.0 and now["ema"] is None
            else:
                assert {field: now[field] for field in was} == was
        assert group["final"] == committed["groups"][label]["final"] and group["seeds"] == [0, 1]
    assert set(summary["figures"]) == {
        "fig1_accuracy.png",
        "fig2_heldout.png",
        "fig3_shifts.png",
        "fig5_rejection.png",
        "health.png",
    }


# --- arms of a regime study that must not merge: shadow optimizer, calibration, lr ladder, starting policy ---

CAPO_SELECTOR = "capo_lightning.selection.CAPOSelector"


def capo(**init_args: object) -> dict:
    """A CAPOSelector entry of config.yaml with exactly these init_args (absent keys: the selector's defaults)."""
    return {"class_path": CAPO_SELECTOR, "init_args": dict(init_args)}


def without(mapping: dict, key: str) -> dict:
    """``mapping`` less ``key``."""
    return {name: value for name, value in mapping.items() if name != key}


def write_arm(
    folder: Path,
    seed: int,
    selector: dict | None = None,
    lr: float = 2e-5,
    policy: str | None = None,
    regime: str | None = None,
) -> Path:
    """``write_run`` plus, when given, ``model.policy.name_or_path`` and a named ``regime`` in config.yaml."""
    write_run(folder, known_values(0, seed, selector), seed, selector, lr)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    if policy is not None:
        config["model"]["policy"] = {"name_or_path": policy, "dtype": "float32"}
    if regime is not None:
        config["regime"] = {"name": regime, "lr_scale": 1.0, "batch_scale": 1.0}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return folder


def labelled(dirs: list[Path], overrides: dict[int, str] | None = None) -> list[tuple[str, list]]:
    """(label, seeds) of each group of the runs in ``dirs``, in group order."""
    groups, _ = group_runs([load_run(path) for path in dirs], overrides)
    return [(group.label, group.seeds) for group in groups]


def test_shadow_optimizer_model_splits_arms_and_default_adam_adds_nothing(tmp_path: Path) -> None:
    thresholds = {"enforce": True, "delta_f": 1e-3, "tau_h": 5e-4}
    dirs = [write_arm(tmp_path / f"adam{seed}", seed, capo(**thresholds)) for seed in (0, 1)]  # absent: adam
    dirs.append(write_arm(tmp_path / "adam2", 2, capo(**thresholds, optimizer_model="adam")))
    dirs += [write_arm(tmp_path / f"sgd{seed}", seed, capo(**thresholds, optimizer_model="sgd")) for seed in (0, 1)]
    assert labelled(dirs) == [
        ("GRPO + CAPO δF 0.001 τH 0.0005 · lr 2e-05, 32/step", [0, 1, 2]),
        ("GRPO + CAPO δF 0.001 τH 0.0005 (SGD shadow) · lr 2e-05, 32/step", [0, 1]),
    ]
    assert [load_run(path).shadow for path in (dirs[0], dirs[2], dirs[3])] == ["adam", "adam", "sgd"]
    assert load_run(write_arm(tmp_path / "plain", 0)).shadow is None


def test_calibrated_selector_is_labelled_by_its_percentile_not_the_configured_thresholds(tmp_path: Path) -> None:
    fixed = {"enforce": True, "delta_f": 1e-4, "tau_h": 0.01}  # a calibrating run still carries these in its config
    auto = {**fixed, "calibration_steps": 5, "calibration_percentile": 95.0}  # absent: 95, the default
    dirs = [
        write_arm(tmp_path / "fixed0", 0, capo(**fixed)),  # calibration keys absent: off
        write_arm(tmp_path / "fixed1", 1, capo(**fixed, calibration_steps=0, calibration_lr=None)),  # 0: off
        write_arm(tmp_path / "auto0", 0, capo(**auto)),
        write_arm(tmp_path / "auto1", 1, capo(**without(auto, "calibration_percentile"), calibration_lr=None)),
        write_arm(tmp_path / "auto_lr0", 0, capo(**auto, calibration_lr=1.5e-5)),
        write_arm(tmp_path / "auto_p99", 0, capo(**auto | {"calibration_percentile": 99.5})),
    ]
    assert labelled(dirs) == [
        ("GRPO + CAPO δF 0.0001 τH 0.01 · lr 2e-05, 32/step", [0, 1]),
        ("GRPO + CAPO auto p95 · lr 2e-05, 32/step", [0, 1]),
        ("GRPO + CAPO auto p95 @lr 1.5e-05 · lr 2e-05, 32/step", [0]),
        ("GRPO + CAPO auto p99.5 · lr 2e-05, 32/step", [0]),
    ]
    runs = [load_run(path) for path in dirs]
    assert runs[0].calibration is None and runs[1].calibration is None
    assert runs[2].calibration == Calibration(steps=5, percentile=95.0, lr=None)
    assert runs[4].calibration == Calibration(steps=5, percentile=95.0, lr=1.5e-5)
    assert all("δF" not in run.selector and "τH" not in run.selector for run in runs[2:])


def test_calibrations_that_print_alike_are_told_apart_by_their_settings(tmp_path: Path) -> None:
    auto = {"enforce": True, "delta_f": 1e-4, "tau_h": 0.01, "calibration_percentile": 95.0}
    dirs = [write_arm(tmp_path / f"steps{steps}", 0, capo(**auto, calibration_steps=steps)) for steps in (5, 10)]
    base = "GRPO + CAPO auto p95 · lr 2e-05, 32/step"
    assert labelled(dirs) == [
        (f"{base} [calibration 5 steps p95.0 lr None]", [0]),
        (f"{base} [calibration 10 steps p95.0 lr None]", [0]),
    ]


def test_monitor_that_advances_its_shadow_adam_is_its_own_arm(tmp_path: Path) -> None:
    dirs = [write_arm(tmp_path / "m0", 0, MONITOR), write_arm(tmp_path / "m1", 1, capo(enforce=False))]
    dirs.append(write_arm(tmp_path / "m2", 2, capo(enforce=False, advance_when_monitoring=False)))
    advance = capo(enforce=False, advance_when_monitoring=True)
    dirs += [write_arm(tmp_path / f"a{seed}", seed, advance) for seed in (0, 1)]
    dirs.append(write_arm(tmp_path / "sgd", 0, capo(enforce=False, optimizer_model="sgd")))
    dirs.append(write_arm(tmp_path / "cal", 0, capo(enforce=False, calibration_steps=4, calibration_percentile=90)))
    dirs.append(write_arm(tmp_path / "cal_default", 1, capo(enforce=False, calibration_steps=4)))  # p95, the default
    assert labelled(dirs) == [
        ("GRPO (monitor) · lr 2e-05, 32/step", [0, 1, 2]),
        ("GRPO (monitor, Adam shadow) · lr 2e-05, 32/step", [0, 1]),
        ("GRPO (monitor, SGD shadow) · lr 2e-05, 32/step", [0]),
        ("GRPO (monitor, auto p90) · lr 2e-05, 32/step", [0]),
        ("GRPO (monitor, auto p95) · lr 2e-05, 32/step", [1]),
    ]
    advancing = load_run(dirs[3])
    assert advancing.advance_when_monitoring and not advancing.enforces
    assert not load_run(dirs[0]).advance_when_monitoring


def test_lr_ladder_of_one_regime_splits_and_prints_the_lr(tmp_path: Path) -> None:
    # the saved config holds the effective lr (the regime's scale applied), e.g. 7.500000000000001e-05
    ladder = (1.5e-5 * 5, 1.5e-4)
    dirs = [
        write_arm(tmp_path / f"agg{index}_s{seed}", seed, lr=lr, regime="aggressive")
        for index, lr in enumerate(ladder)
        for seed in (0, 1)
    ]
    dirs += [write_arm(tmp_path / f"cons_s{seed}", seed, lr=1.5e-5, regime="conservative") for seed in (0, 1)]
    assert labelled(dirs) == [
        ("GRPO · aggressive, lr 7.5e-05", [0, 1]),
        ("GRPO · aggressive, lr 0.00015", [0, 1]),
        ("GRPO · conservative", [0, 1]),  # one lr in this regime: no lr printed
    ]
    assert load_run(dirs[0]).lr == 1.5e-5 * 5
    # one point of the ladder alone reads as the plain regime
    assert labelled([dirs[0], dirs[1], *dirs[4:]]) == [("GRPO · aggressive", [0, 1]), ("GRPO · conservative", [0, 1])]
    # an unnamed regime prints its lr already; lrs it rounds alike still never merge
    close = [write_arm(tmp_path / f"close{index}", 0, lr=lr) for index, lr in enumerate((2e-5, 2.0000001e-5))]
    labels = [label for label, _ in labelled(close)]
    assert len(labels) == 2 and labels[0] != labels[1] and all("lr 2e-05, 32/step" in label for label in labels)


def test_starting_policy_splits_and_is_printed_only_when_runs_differ(tmp_path: Path) -> None:
    bundled = "bundled:smollm2-135m-instruct"
    dirs = [write_arm(tmp_path / f"base{seed}", seed, CAPO, policy=bundled) for seed in (0, 1)]
    dirs.append(write_arm(tmp_path / "base2", 2, CAPO))  # no model.policy: PolicySpec's default, the same policy
    dirs += [write_arm(tmp_path / f"warm{seed}", seed, CAPO, policy="runs/warm_start/policy") for seed in (0, 1)]
    summary = build_report(dirs, tmp_path / "out")
    assert {label: group["seeds"] for label, group in summary["groups"].items()} == {
        f"{CAPO_LABEL}, from smollm2-135m-instruct": [0, 1, 2],
        f"{CAPO_LABEL}, from warm_start": [0, 1],
    }
    assert load_run(dirs[2]).policy == bundled and load_run(dirs[3]).policy == "runs/warm_start/policy"
    assert labelled(dirs[:3]) == [(CAPO_LABEL, [0, 1, 2])]  # one policy: nothing printed
    # two policies with one short name are told apart by their full name_or_path
    twins = [write_arm(tmp_path / f"twin{name}", 0, policy=f"{name}/warm_start/policy") for name in ("a", "b")]
    assert labelled(twins) == [
        (f"{BASE_LABEL}, from warm_start [policy a/warm_start/policy]", [0]),
        (f"{BASE_LABEL}, from warm_start [policy b/warm_start/policy]", [0]),
    ]


def test_policy_names_are_short() -> None:
    assert policy_name("bundled:smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert policy_name("runs/warm_start/policy") == "warm_start"
    assert policy_name("runs/warm_start/policy/") == "warm_start"
    assert policy_name("/data/exp1/checkpoints/last") == "exp1"
    assert policy_name("Qwen/Qwen2.5-Math-7B") == "Qwen2.5-Math-7B"
    assert policy_name("tiny:3") == "tiny:3"
    assert policy_name("policy") == "policy"


def test_label_overrides_still_group_whatever_the_facets(tmp_path: Path) -> None:
    dirs = [
        write_arm(tmp_path / "lr1", 0, lr=7.5e-5, regime="aggressive"),
        write_arm(tmp_path / "lr2", 1, lr=1.5e-4, regime="aggressive", policy="runs/warm_start/policy"),
        write_arm(tmp_path / "lr3", 0, lr=1.5e-4, regime="aggressive"),
    ]
    assert labelled(dirs, {0: "mine", 1: "mine"}) == [("mine", [0, 1]), ("GRPO · aggressive", [0])]
    # only the automatically labelled runs decide whether lr and policy are printed
    assert labelled(dirs, {0: "mine"}) == [
        ("mine", [0]),
        ("GRPO · aggressive, from warm_start", [1]),
        ("GRPO · aggressive, from smollm2-135m-instruct", [0]),
    ]


# --- Fig. 1's target and the sample efficiency in summary.json ---

OFFSETS = (-0.01, 0.0, 0.01)  # per seed; their mean is 0


@pytest.fixture
def rising(tmp_path: Path) -> tuple[list[Path], dict[str, list[list[float]]]]:
    """GRPO (no selector, the reference) rising 0.1 per step, GRPO + CAPO 0.19 per step; 3 seeds, 32 per step."""
    dirs, accuracy = [], {BASE_LABEL: [], CAPO_LABEL: []}
    for group, (label, selector, slope) in enumerate(((BASE_LABEL, None, 0.1), (CAPO_LABEL, CAPO, 0.19))):
        for seed, offset in enumerate(OFFSETS):
            values = known_values(group, seed, selector)
            values["train/accuracy"] = {s: round(slope * s + offset, 4) for s in STEPS}
            dirs.append(write_run(tmp_path / "runs" / f"g{group}_s{seed}", values, seed, selector))
            accuracy[label].append([values["train/accuracy"][s] for s in STEPS])
    return dirs, accuracy


def series_of(accuracy: list[list[float]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The runs' (x, y) as written, not as read back: x = 32 s."""
    return [(np.array([float(PER_STEP * s) for s in STEPS]), np.array(values)) for values in accuracy]


def test_fig1_target_and_summary_efficiency_match_sample_efficiency(rising, tmp_path: Path) -> None:
    dirs, accuracy = rising
    summary = build_report(dirs, tmp_path / "out")
    assert "fig1_accuracy.png" in summary["figures"]
    assert matplotlib.image.imread(tmp_path / "out" / "fig1_accuracy.png")[..., :3].std() > 0.01
    reference = series_of(accuracy[BASE_LABEL])
    for label in (BASE_LABEL, CAPO_LABEL):
        direct = sample_efficiency(series_of(accuracy[label]), reference, Window(64.0), 64.0).as_dict()
        entry = summary["groups"][label]["efficiency"]["train/accuracy"]
        assert entry == {"reference": BASE_LABEL, **direct}
    # by hand: a 64-completion window at 32 per step averages two steps; the offsets cancel in the mean.
    # GRPO's smoothed mean at 160 completions is (0.4 + 0.5) / 2 = 0.45, the target; CAPO's means are 0.19, 0.285,
    # 0.475, 0.665, 0.855: first at or above 0.45 at 96 completions, and it stays there -> 160 / 96
    capo_entry = summary["groups"][CAPO_LABEL]["efficiency"]["train/accuracy"]
    assert capo_entry["target"] == pytest.approx(0.45) and capo_entry["reference_completions"] == 160.0
    assert capo_entry["crossing"] == 96.0 and capo_entry["ratio"] == pytest.approx(160 / 96)
    assert capo_entry["smoothing"] == "trailing window of 64 completions" and capo_entry["sustain"] == SUSTAIN
    base_entry = summary["groups"][BASE_LABEL]["efficiency"]["train/accuracy"]
    assert base_entry["crossing"] == 160.0 and base_entry["ratio"] == 1.0  # the reference: at its final point


def test_fig1_draws_the_target_line_and_crossing_stars(rising) -> None:
    from matplotlib.figure import Figure

    dirs, _ = rising
    groups, _ = group_runs([load_run(path) for path in dirs])
    for group in groups:
        summarize_group(group)
    axes = Figure().subplots()
    assert draw_target(axes, groups, "train/accuracy", None, 100.0)
    dashed = [line for line in axes.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(45.0)
    assert dashed[0].get_label() == f"{BASE_LABEL} (final)"
    stars = sorted(
        (float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in axes.lines if line.get_marker() == "*"
    )
    assert [x for x, _ in stars] == [96.0, 160.0]  # CAPO at 96 (its mean 0.475 there), GRPO at its last point
    assert [y for _, y in stars] == pytest.approx([47.5, 45.0])
    # naming a group without a train/accuracy curve as reference: no line
    assert not draw_target(Figure().subplots(), groups, "train/accuracy", "nope", 100.0)


def test_window_and_ema_override_every_metric_and_exclude_each_other(
    rising, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dirs, accuracy = rising
    main([*map(str, dirs), "--out", str(tmp_path / "w"), "--window", "32"])  # one step of 32: no smoothing
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    for key in ("train/accuracy", "objective/entropy", "val/accuracy"):
        curve = summary["groups"][BASE_LABEL]["curves"][key]
        assert curve["window"] == 32.0 and curve["ema"] is None
        assert curve["mean"] == pytest.approx(curve["raw_mean"], rel=1e-12)
    assert summary["groups"][BASE_LABEL]["curves"]["train/accuracy"]["mean"] == pytest.approx(
        [statistics.mean(run[i] for run in accuracy[BASE_LABEL]) for i in range(len(STEPS))]
    )
    entry = summary["groups"][CAPO_LABEL]["efficiency"]["train/accuracy"]
    direct = sample_efficiency(series_of(accuracy[CAPO_LABEL]), series_of(accuracy[BASE_LABEL]), Window(32.0), 64)
    assert entry == {"reference": BASE_LABEL, **direct.as_dict()}
    assert entry["smoothing"] == "trailing window of 32 completions"

    summary = build_report(dirs, tmp_path / "e", ema=0.5)
    curve = summary["groups"][CAPO_LABEL]["curves"]["train/accuracy"]
    assert curve["ema"] == 0.5 and curve["window"] is None and curve["smoothing"] == "EMA α 0.5"
    smoothed = [hand_ema(values, 0.5) for values in accuracy[CAPO_LABEL]]
    expected = [statistics.mean(run[i] for run in smoothed) for i in range(len(STEPS))]
    assert curve["mean"] == pytest.approx(expected, rel=1e-12)
    entry = summary["groups"][CAPO_LABEL]["efficiency"]["train/accuracy"]
    direct = sample_efficiency(series_of(accuracy[CAPO_LABEL]), series_of(accuracy[BASE_LABEL]), EMA(0.5), 64)
    assert entry == {"reference": BASE_LABEL, **direct.as_dict()}

    with pytest.raises(ValueError, match="--ema and --window are mutually exclusive"):
        build_report(dirs, tmp_path / "x", ema=0.5, window=64.0)
    for bad in (0.0, -3.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="--window must be a positive number of completions"):
            build_report(dirs, tmp_path / "x", window=bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(dirs[0]), "--out", str(tmp_path / "x"), "--ema", "0.5", "--window", "64"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(dirs[0]), "--out", str(tmp_path / "x"), "--window", "-1"])
    assert exit_info.value.code == 2 and "--window must be a positive number" in capsys.readouterr().err
