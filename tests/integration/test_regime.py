"""Regimes through the real CLI: the multipliers land on the instantiated trainer, module and DataModule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capo_lightning.cli import CapoCLI, build_cli
from tests.conftest import ROOT

TINY = str(ROOT / "conf/debug/tiny_cpu.yaml")
BASE = ["--data.prompts_per_step=24", "--trainer.max_steps=10", "--trainer.val_check_interval=5"]


def build(tmp_path: Path, *extra: str) -> CapoCLI:
    args = ["--config", TINY, *BASE, f"--trainer.default_root_dir={tmp_path}/{{run}}", *extra]
    return build_cli(args, run=False)


def _lr(cli: CapoCLI) -> float:
    return cli.model.optimizer_factory([torch.zeros(1, requires_grad=True)]).param_groups[0]["lr"]


def test_aggressive_regime_scales_lr_batch_steps_and_validation(tmp_path: Path) -> None:
    conservative = build(tmp_path, "--regime", str(ROOT / "conf/regime/conservative.yaml"))
    aggressive = build(tmp_path, "--regime", str(ROOT / "conf/regime/aggressive.yaml"))
    assert _lr(aggressive) == pytest.approx(5 * _lr(conservative))
    assert (conservative.datamodule.prompts_per_step, aggressive.datamodule.prompts_per_step) == (24, 2)
    assert (conservative.trainer.max_steps, aggressive.trainer.max_steps) == (10, 20)
    assert (conservative.trainer.val_check_interval, aggressive.trainer.val_check_interval) == (5, 10)
    # each run in its own folder, named after what it trains; the saved config keeps the applied values
    assert Path(aggressive.trainer.default_root_dir).name == "GRPO-none-aggressive-s0"
    saved = aggressive.config["regime"]
    assert saved.name == "aggressive" and saved.lr_scale == saved.batch_scale == saved.steps_scale == 1.0


def test_a_batch_the_regime_cannot_divide_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"regime.batch_scale makes data.prompts_per_step = 0.5"):
        build(tmp_path, "--data.prompts_per_step=6", "--regime", str(ROOT / "conf/regime/aggressive.yaml"))


def test_seeds_are_real_replicates(tmp_path: Path) -> None:
    # the DataModule's seed follows seed_everything unless set: other prompts and samples, not only another name
    assert build(tmp_path, "--seed_everything=3").datamodule.seed == 3
    assert build(tmp_path, "--seed_everything=3", "--data.seed=7").datamodule.seed == 7
