"""Every W&B sweep under sweeps/ is well formed and each of its runs parses through the real CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from capo_lightning.cli import main
from tests.conftest import ROOT

SWEEPS = sorted((ROOT / "sweeps").rglob("*.yaml"))
LOGGED_KEY_SOURCES = [ROOT / "capo_lightning/module.py", ROOT / "capo_lightning/training/step_metrics.py"]


def test_sweeps_are_found() -> None:
    assert len(SWEEPS) >= 1


def render_runs(sweep: dict) -> list[list[str]]:
    """Turn the sweep's grid into argv lists, rendering ${args} the way the W&B agent does (--key=value)."""
    names = list(sweep["parameters"])
    grids = [sweep["parameters"][n].get("values", [sweep["parameters"][n].get("value")]) for n in names]
    base = [tok for tok in sweep["command"] if tok not in ("${env}", "${args}", "capo")]
    return [base + [f"--{n}={v}" for n, v in zip(names, combo)] for combo in itertools.product(*grids)]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_is_valid(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["metric"]["goal"] in {"maximize", "minimize"}
    assert "${args}" in sweep["command"] and "capo" in sweep["command"]
    metric = sweep["metric"]["name"]
    assert any(f'"{metric}"' in src.read_text() for src in LOGGED_KEY_SOURCES), f"{metric} is never logged"
    runs = render_runs(sweep)
    assert runs
    for argv in runs:
        argv = [str(ROOT / a) if a.startswith("conf/") else a for a in argv]
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--print_config"])
        assert exc.value.code in (0, None), argv
        assert "class_path" in capsys.readouterr().out
