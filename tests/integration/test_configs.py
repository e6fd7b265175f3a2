"""Every YAML under conf/ parses through the real CLI (recursive, count asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from capo_lightning.commands.cli import main
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "conf").rglob("*.yaml"))
BASE = ROOT / "conf/debug/tiny_cpu.yaml"
STUDY_BASE = ROOT / "conf/study/base.yaml"


def test_the_config_tree_is_found() -> None:
    names = {str(p.relative_to(ROOT / "conf")) for p in CONFIGS}
    assert len(CONFIGS) >= 6
    assert {"quickstart.yaml", "debug/tiny_cpu.yaml", "objective/grpo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "conf")))
def test_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fragments (objective/, selector/, ...) are stacked on a complete config, as users do
    args = ["fit", "--config", str(BASE), "--config", str(path)]
    if path in (BASE, STUDY_BASE) or path.name == "quickstart.yaml":
        args = ["fit", "--config", str(path)]
    elif path.parent.name == "regime":  # the `regime` group alone, on a base it keeps whole (prompts: 12k)
        args = ["fit", "--config", str(STUDY_BASE), "--regime", str(path)]
    elif path.parent.name == "study":  # study arms stack on the study's base
        args = ["fit", "--config", str(STUDY_BASE), "--config", str(path)]
    elif path.parent.parent.name == "experiment":  # the paper's arms stack on their base
        base = path.parent / "base.yaml"
        args = ["fit", "--config", str(base)] + (["--config", str(path)] if path != base else [])
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("regime", sorted((ROOT / "conf/regime").glob("*.yaml")), ids=lambda p: p.stem)
def test_study_stacks_parse(regime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # as scripts/study.sh stacks them: base, regime, arm
    arms = sorted(p for p in (ROOT / "conf/study").glob("*.yaml") if p != STUDY_BASE)
    assert len(arms) >= 4
    for arm in arms:
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--config", str(STUDY_BASE), "--regime", str(regime), "--config", str(arm), "--print_config"])
        assert exc.value.code in (0, None), arm
        printed = capsys.readouterr().out
        assert f"name: {regime.stem}" in printed and "CAPOSelector" in printed


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_the_multi_gpu_trainer_configs_train_on_two_cpu_processes(tmp_path: Path, trainer: str) -> None:
    """conf/trainer/{ddp,fsdp}.yaml as shipped (DDP: no per-forward buffer broadcast, bucket-view gradients;
    FSDP2: bf16 compute over fp32 shards), on gloo instead of GPUs, through the CLI with every callback."""
    import subprocess
    import sys

    import yaml

    from tests.helpers import read_csv_metrics

    command = [
        sys.executable, "-m", "capo_lightning.commands.cli", "fit", "--config", str(BASE),
        "--config", str(ROOT / f"conf/trainer/{trainer}.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.precision=32-true", "--model.selector=capo_lightning.selection.CAPOSelector",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = yaml.safe_load(BASE.read_text())["data"]
    per_rank = data["prompts_per_step"] * data["group_size"]
    rows = [r for r in read_csv_metrics(tmp_path / "logs") if "train/completions_total" in r]
    assert [r["step"] for r in rows] == [1.0, 2.0]
    assert [r["train/completions_total"] for r in rows] == [2 * per_rank, 4 * per_rank]  # two ranks a step
