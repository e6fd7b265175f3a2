"""scripts/warm_study_table.py: docs/results.md's tables of the warm-started study, checked against the script and
on small synthetic studies whose outcome is known by construction (which runs collapse, which commit they ran)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "docs/study/warm"


def _script():
    spec = importlib.util.spec_from_file_location("warm_study_table", ROOT / "scripts/warm_study_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_results_page_shows_the_tables_the_script_computes() -> None:
    """The page names the finished runs its tables cover; the script's output over exactly those runs is in
    docs/results.md, every line verbatim (runs the driver committed since only extend the study)."""
    page = (ROOT / "docs/results.md").read_text()
    names = _script().named_runs(page)
    assert names, "docs/results.md shows no warm-study table; paste scripts/warm_study_table.py's output"
    missing = [line for line in _script().table(STUDY, names).splitlines() if line.strip() and line not in page]
    assert missing == [], "docs/results.md is out of date; rerun scripts/warm_study_table.py:\n" + "\n".join(missing)


def test_the_page_reader_and_the_run_filter(tmp_path: Path) -> None:
    script = _script()
    assert script.named_runs("x\nRuns in these tables (2): a_s0, b_s1.\n| t |") == ["a_s0", "b_s1"]
    assert script.named_runs("no table yet") is None
    for seed in (0, 1):
        _write_run(tmp_path / f"grpo_s{seed}", "conservative", 1.5e-5, {"enforce": False}, seed, collapse=False)
    both, one = script.table(tmp_path), script.table(tmp_path, ["grpo_s1"])
    assert both.splitlines()[0] == "Runs in these tables (2): grpo_s0, grpo_s1."
    assert one.splitlines()[0] == "Runs in these tables (1): grpo_s1." and "| 1 |" in one and "| 0,1 |" in both
    with pytest.raises(SystemExit, match="grpo_s7"):
        script.table(tmp_path, ["grpo_s7"])


def _write_run(
    folder: Path, regime: str, lr: float, selector: dict, seed: int, collapse: bool, commit: str = "a"
) -> None:
    """A 20-step run of 16 completions per step: healthy, or with its entropy crashing after step 8."""
    folder.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "regime": {"name": regime},
        "model": {
            "policy": {"name_or_path": "runs/warm_start/policy"},
            "objective": {"class_path": "capo_lightning.objectives.GRPO"},
            "selector": {"class_path": "capo_lightning.selection.CAPOSelector", "init_args": selector},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
        },
        "data": {"prompts_per_step": 2, "group_size": 8},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 0, "val/accuracy": 0.5}]
    for step in range(1, 21):
        entropy = 0.001 if collapse and step > 8 else 1.0
        rows.append({
            "step": step, "train/completions_total": 16 * step, "train/reward_mean": 0.5, "train/accuracy": 0.5,
            "objective/entropy": entropy, "rollout/response_length_mean": 15.0, "rollout/truncated_frac": 0.0,
            "objective/grad_norm": 1.0, "select/token_reject_rate": 0.05,
        })  # fmt: skip
    rows.append({"step": 20, "val/accuracy": 0.5})
    keys = sorted({key for row in rows for key in row})
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "provenance.json").write_text(json.dumps({"commit": commit, "policy_sha256": "x"}))


MONITOR = {"enforce": False, "advance_when_monitoring": True, "delta_f": 1e-4, "tau_h": 0.01}
AUTO = {"enforce": True, "calibration_steps": 3, "calibration_percentile": 95.0, "delta_f": 1e-4, "tau_h": 0.01}


def test_the_frontier_is_the_largest_rate_below_which_no_seed_collapsed(tmp_path: Path) -> None:
    """GRPO: stable at 2x, one seed of three collapses at 3x, all at 5x -> frontier 2x. CAPO: stable at every
    rate -> 5x. The alarm column counts the collapsed runs."""
    collapsed = {("aggressive_lr2x", 2): set(), ("aggressive_lr3x", 3): {1}, ("aggressive", 5): {0, 1, 2}}
    for (regime, k), bad in collapsed.items():
        for seed in range(3):
            _write_run(tmp_path / f"{regime}_grpo_s{seed}", regime, 1.5e-5 * k, MONITOR, seed, seed in bad)
            _write_run(tmp_path / f"{regime}_capo_s{seed}", regime, 1.5e-5 * k, AUTO, seed, False)
    text = _script().table(tmp_path)
    grpo = next(line for line in text.splitlines() if line.startswith("| GRPO (monitor, Adam shadow) |"))
    capo = next(line for line in text.splitlines() if line.startswith("| GRPO + CAPO auto p95 |"))
    assert grpo == "| GRPO (monitor, Adam shadow) | 0/3 | 1/3 | 3/3 | 2× |"
    assert capo == "| GRPO + CAPO auto p95 | 0/3 | 0/3 | 0/3 | 5× |"
    row = next(line for line in text.splitlines() if line.startswith("| GRPO (monitor, Adam shadow) · aggressive |"))
    assert "| 3/3 (entropy_collapse) |" in row


def test_a_collapse_at_the_smallest_rate_leaves_no_frontier(tmp_path: Path) -> None:
    for regime, k in (("aggressive_lr2x", 2), ("aggressive_lr3x", 3)):
        for seed in range(2):
            _write_run(tmp_path / f"{regime}_grpo_s{seed}", regime, 1.5e-5 * k, MONITOR, seed, k == 2 and seed == 0)
    line = next(
        row for row in _script().table(tmp_path).splitlines() if row.startswith("| GRPO (monitor, Adam shadow) |")
    )
    assert line.endswith("| below 2× |") and "| 1/2 | 0/2 | not run |" in line


def test_an_arm_whose_runs_span_commits_is_named(tmp_path: Path) -> None:
    for seed, commit in enumerate(("a", "a", "b")):
        _write_run(tmp_path / f"aggressive_grpo_s{seed}", "aggressive", 7.5e-5, MONITOR, seed, False, commit)
    assert "runs span 2 values of commit; rerun the arm on one" in _script().table(tmp_path)


def test_sample_efficiency_is_against_conservative_grpo(tmp_path: Path) -> None:
    """A conservative GRPO arm at 0.5 and an aggressive arm at 0.5 from its first window: the aggressive arm reaches
    the target after 16 completions, held 64 -> N× = 320 (the reference's final completions) / 16 = 20."""
    for seed in range(2):
        _write_run(tmp_path / f"conservative_grpo_s{seed}", "conservative", 1.5e-5, MONITOR, seed, False)
        _write_run(tmp_path / f"aggressive_capo_s{seed}", "aggressive", 7.5e-5, AUTO, seed, False)
    row = next(line for line in _script().table(tmp_path).splitlines() if "CAPO auto p95 · aggressive" in line)
    assert "| 20.00× at 16 (" in row
    with pytest.raises(StopIteration):
        next(line for line in _script().table(tmp_path).splitlines() if "never" in line)


def test_the_pinned_commit_and_its_fix_outside_the_training_path_are_one_code_version(tmp_path: Path) -> None:
    pinned, fixed = "3b7b2b3e26703c0c681346ad4fbbb7f78cb39119", "94b1e8c2ba8b3c48035bfaa0c4e8d9035b6119df"
    assert _script().SAME_TRAINING_CODE == {fixed: pinned}
    for seed, commit in enumerate((pinned, pinned, fixed)):
        _write_run(tmp_path / f"aggressive_grpo_s{seed}", "aggressive", 7.5e-5, MONITOR, seed, False, commit)
    assert "runs span" not in _script().table(tmp_path)
