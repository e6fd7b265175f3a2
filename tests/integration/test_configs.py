"""Every YAML under conf/ parses through the real CLI (recursive, count asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from capo_lightning.cli import main
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "conf").rglob("*.yaml"))
BASE = ROOT / "conf/debug/tiny_cpu.yaml"


def test_the_config_tree_is_found() -> None:
    names = {str(p.relative_to(ROOT / "conf")) for p in CONFIGS}
    assert len(CONFIGS) >= 6
    assert {"quickstart.yaml", "debug/tiny_cpu.yaml", "objective/grpo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "conf")))
def test_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fragments (objective/, selector/, ...) are stacked on a complete config, as users do
    args = (
        ["fit", "--config", str(path)]
        if path == BASE or path.name == "quickstart.yaml"
        else ["fit", "--config", str(BASE), "--config", str(path)]
    )
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
