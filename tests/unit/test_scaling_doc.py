"""docs/scaling.md runs what it says: its launch commands parse through the CLI, its memory table is the
script's output."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys

import pytest

from capo_lightning.commands.cli import main
from tests.conftest import ROOT

DOC = (ROOT / "docs/scaling.md").read_text()


def _commands() -> list[list[str]]:
    """The `fit` arguments of every launch command in the document's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)
    found = []
    for line in (line for block in blocks for line in block.splitlines()):
        if " fit " in line and not line.lstrip().startswith("#"):
            found.append(shlex.split(line.split(" fit ", 1)[1]))
    return found


def test_the_document_has_each_kind_of_launch() -> None:
    text = "\n".join(re.findall(r"```bash\n(.*?)```", DOC, flags=re.S))
    assert "torchrun --nproc-per-node" in text and "--nnodes 2" in text and "srun python -m capo_lightning" in text
    assert len(_commands()) >= 4


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a)[-60:])
def test_each_launch_command_parses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    local = [str(ROOT / a) if a.startswith("conf/") else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["fit", *local, "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path" in out
    if "--trainer.num_nodes" in argv:
        assert f"num_nodes: {argv[argv.index('--trainer.num_nodes') + 1]}" in out


def test_the_memory_tables_are_the_scripts_output() -> None:
    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "scripts/memory_estimate.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    assert script.table() in DOC and script.table(ranks=1, micro=8) in DOC
    # the parameter counts the table is built on match the published sizes (1.54 B and 7.62 B)
    small, large = script.MODELS
    assert round(small.params / 1e9, 2) == 1.54 and round(large.params / 1e9, 2) == 7.62
