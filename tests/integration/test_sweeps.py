"""Every W&B sweep under sweeps/ is well formed and each of its runs parses through the real CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from capo_lightning.commands.cli import main
from tests.conftest import ROOT

SWEEPS = sorted((ROOT / "sweeps").rglob("*.yaml"))
DISTRIBUTIONS = {"uniform", "log_uniform_values", "q_uniform", "q_log_uniform_values", "int_uniform", "normal"}


def test_sweeps_are_found() -> None:
    assert len(SWEEPS) >= 1


def parameter_values(spec: dict) -> list:
    """The values a parameter takes: its grid, or the two ends of its distribution (what CI can afford)."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    assert spec["distribution"] in DISTRIBUTIONS, spec
    assert spec["min"] < spec["max"], spec
    return [spec["min"], spec["max"]]


def render_runs(sweep: dict) -> list[list[str]]:
    """Turn the sweep into argv lists, rendering ${args} the way the W&B agent does (--key=value)."""
    names = list(sweep["parameters"])
    grids = [parameter_values(sweep["parameters"][n]) for n in names]
    command = sweep["command"]
    base = [tok for tok in command[command.index("fit") :] if tok != "${args}"]  # after `capo` or a launcher
    return [base + [f"--{n}={v}" for n, v in zip(names, combo)] for combo in itertools.product(*grids)]


def _local(token: str) -> str:
    """A repository path (alone or after ``--key=``) made absolute, so the test runs from any folder."""
    key, sep, value = token.rpartition("=")
    if value.startswith("conf/"):
        return f"{key}{sep}{ROOT / value}"
    return token


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_is_valid(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["method"] != "grid" or all("values" in p or "value" in p for p in sweep["parameters"].values())
    assert sweep["metric"]["goal"] in {"maximize", "minimize"}
    command = sweep["command"]
    assert "${args}" in command and ("capo" in command or "capo_lightning" in command)
    assert any("conf/logger/wandb" in token for token in command), "the sweep must log to W&B"
    assert any(t.startswith("--trainer.default_root_dir=") and "{run}" in t for t in command), "one folder per run"
    assert sweep["metric"]["name"] in logged_keys(), f"{sweep['metric']['name']} is never logged"
    runs = render_runs(sweep)
    assert runs
    for argv in runs:
        argv = [_local(token) for token in argv]
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--print_config"])
        assert exc.value.code in (0, None), argv
        assert "class_path" in capsys.readouterr().out


def logged_keys() -> set[str]:
    """Every key a real run logged: the header of the committed study's metrics.csv files."""
    keys: set[str] = set()
    for path in (ROOT / "docs/study").rglob("metrics.csv"):
        keys |= set(path.read_text().splitlines()[0].split(","))
    assert "train/reward_mean" in keys
    return keys
