"""Regimes through the real CLI: the multipliers land on the instantiated trainer, module and DataModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from capo_lightning.commands.cli import CapoCLI, build_cli, main
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


# --print_config shows the effective config: the regime applied, as the run uses and saves it

STUDY = ROOT / "conf/study"
REGIMES = ROOT / "conf/regime"


def printed(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """The config ``capo <args> --print_config`` prints, parsed; it must exit 0."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _values(config: dict[str, Any]) -> dict[str, Any]:
    trainer, model = config["trainer"], config["model"]
    return {
        "lr": model["optimizer"]["init_args"]["lr"],
        "warmup_ratio": model["lr_scheduler"]["init_args"]["warmup_ratio"],
        "prompts_per_step": config["data"]["prompts_per_step"],
        "max_steps": trainer["max_steps"],
        "val_check_interval": trainer["val_check_interval"],
        "data_seed": config["data"]["seed"],
        "scales": [config["regime"][k] for k in ("lr_scale", "batch_scale", "steps_scale")],
    }


@pytest.mark.parametrize(
    ("regime", "lr", "prompts", "steps", "interval"),
    [("aggressive", 7.5e-5, 2, 20, 10), ("conservative", 1.5e-5, 24, 10, 5), (None, 1.5e-5, 24, 10, 5)],
)
def test_print_config_shows_the_regime_applied_and_prints_the_same_when_given_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], regime: str | None, lr: float, prompts: int, steps: int,
    interval: int,
) -> None:  # fmt: skip
    regime_args = ["--regime", str(REGIMES / f"{regime}.yaml")] if regime else []
    args = ["fit", "--config", str(STUDY / "base.yaml"), *regime_args, "--config", str(STUDY / "grpo.yaml")]
    config = printed(capsys, *args)
    values = _values(config)
    assert values["lr"] == pytest.approx(lr)
    assert (values["prompts_per_step"], values["max_steps"], values["val_check_interval"]) == (prompts, steps, interval)
    assert values["warmup_ratio"] == 0.1
    assert values["data_seed"] == config["seed_everything"] == 0
    assert values["scales"] == [1.0, 1.0, 1.0]  # applied: given back, the regime is not applied twice
    assert config["regime"]["name"] == (regime or "")
    run = f"GRPO-CAPOmonitor-{regime or 'lr1.5e-05x192'}-s0"
    assert config["trainer"]["default_root_dir"] == f"runs/study/{run}"
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] == f"runs/study/{run}/checkpoints"
    # the printed config given back prints the same config, values included
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(config))
    assert printed(capsys, "fit", "--config", str(again)) == config


def test_print_config_equals_the_config_a_run_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the tiny model for two steps: 1/12 of 12 prompts, twice 1 step, validating at the end
    args = ["fit", "--config", TINY, "--data.prompts_per_step=12", "--trainer.max_steps=1",
            "--trainer.val_check_interval=1", f"--trainer.default_root_dir={tmp_path}/{{run}}",
            "--regime", str(REGIMES / "aggressive.yaml")]  # fmt: skip
    config = printed(capsys, *args)
    values = _values(config)
    assert values["lr"] == pytest.approx(5e-3)
    assert (values["prompts_per_step"], values["max_steps"], values["val_check_interval"]) == (1, 2, 2)
    assert (values["warmup_ratio"], values["data_seed"], values["scales"]) == (0.1, 0, [1.0, 1.0, 1.0])
    root = tmp_path / "GRPO-none-aggressive-s0"
    assert config["trainer"]["default_root_dir"] == str(root)
    assert not root.exists()  # printing runs nothing
    main(args)
    saved = yaml.safe_load(next(root.glob("logs/version_*/config.yaml")).read_text())
    assert saved == config
    assert (root / "checkpoints/last.ckpt").exists()


def test_print_config_keeps_its_flags_and_level_and_builds_no_model(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", TINY, *BASE, "--regime", str(REGIMES / "aggressive.yaml"),
            "--model.policy.name_or_path=/nonexistent/model"]  # fmt: skip  # the run would fail loading it
    full = printed(capsys, *args)
    assert full["data"]["prompts_per_step"] == 2 and full["trainer"]["max_steps"] == 20
    for flags in ("skip_default", "skip_unset", "skip_null"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([*args, f"--print_config={flags}"])
        assert exc.value.code in (0, None)
        shown = yaml.safe_load(capsys.readouterr().out)
        assert shown["data"]["prompts_per_step"] == 2 and shown["trainer"]["max_steps"] == 20, flags
        assert shown["regime"].get("lr_scale", 1.0) == 1.0, flags  # skip_default leaves the default 1.0 out
        assert len(shown) <= len(full), flags
    # before the subcommand: the whole config, the subcommand's under its name (as jsonargparse prints it)
    with pytest.raises(SystemExit) as exc:
        main(["--print_config", *args])
    assert exc.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["fit"] == full
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config=bogus"])
    assert exc.value.code == 2
    assert 'Invalid option "bogus" for --print_config' in capsys.readouterr().err


def test_print_config_leaves_what_the_run_start_decides(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(STUDY / "base.yaml"), "--trainer.default_root_dir=runs/x/{run}-{stamp}"]
    config = printed(capsys, *args)
    # the start time is not known yet: {stamp} stays, and so do the folders under it
    assert config["trainer"]["default_root_dir"] == "runs/x/GRPO-CAPOmonitor-lr1.5e-05x192-s0-{stamp}"
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] is None
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == ""
    # a seed drawn at the start: the run's name (and folder) is not known, data.seed follows the drawn seed
    config = printed(capsys, *args, "--seed_everything=true")
    assert config["trainer"]["default_root_dir"] == "runs/x/{run}-{stamp}"
    assert config["data"]["seed"] is None
