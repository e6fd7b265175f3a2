"""GPU fits of a random-init ~450 M-parameter Qwen2 (no download): every precision on one GPU, and FSDP2 on one
GPU through the CLI with a resume from its sharded checkpoint. Auto-marked ``gpu``; run them with

    pytest -m gpu tests/gpu -s          # -s prints the step timings

``CAPO_GPU_DRY_RUN=1`` rehearses the same code on CPU with a tiny shape (how they were checked without a GPU).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capo_lightning.models.policy import PolicySpec
from capo_lightning.models.tiny import build_tiny_model
from capo_lightning.module import CAPOModule
from capo_lightning.objectives import GRPO
from capo_lightning.selection import CAPOSelector
from tests.conftest import ROOT
from tests.helpers import SGD, make_trainer, tiny_datamodule
from tests.integration.test_precision import Dtypes

DRY = os.environ.get("CAPO_GPU_DRY_RUN") == "1"
ACCELERATOR = "cpu" if DRY else "gpu"
SHAPE = dict(hidden_size=64, num_layers=2) if DRY else dict(hidden_size=2048, num_layers=12)  # ~450 M parameters
pytestmark = pytest.mark.skipif(not DRY and not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gpu_model"), seed=0, **SHAPE)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed"])
@pytest.mark.parametrize("capo", [False, True], ids=["grpo", "capo"])
def test_one_gpu_fits_in_every_precision(model_dir: Path, precision: str, capo: bool) -> None:
    if DRY and precision == "16-mixed":
        pytest.skip("16-mixed needs CUDA")
    torch.manual_seed(0)
    selector = CAPOSelector(delta_f=1e9, tau_h=1e9) if capo else None
    module = CAPOModule(policy=PolicySpec(str(model_dir)), objective=GRPO(), optimizer=SGD(1e-3), selector=selector)
    probe = Dtypes()
    trainer = make_trainer(3, callbacks=[probe], precision=precision, accelerator=ACCELERATOR)
    start = time.perf_counter()
    trainer.fit(module, datamodule=tiny_datamodule(group_size=8))
    seconds = (time.perf_counter() - start) / 3
    params = sum(p.numel() for p in module.policy.parameters())
    print(f"\n{precision:>10} {'CAPO' if capo else 'GRPO'}: {params / 1e6:.0f} M parameters, {seconds:.2f} s/step")
    assert trainer.global_step == 3
    weights = {"bf16-true": torch.bfloat16}.get(precision, torch.float32)
    for step in probe.seen:
        assert step["batch"] == (torch.float32, torch.float32) and step["weights"] == weights
        for key in ("objective/loss", "objective/grad_norm", "train/reward_mean"):
            assert math.isfinite(step["metrics"][key]), (precision, key)
        if capo:
            assert step["adam"] == (torch.float32, torch.float32)
    if capo:
        assert probe.seen[-1]["adam_rows"] > 0


def _fit(model_dir: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "capo_lightning", "fit", "--config", str(ROOT / "conf/debug/tiny_cpu.yaml"),
        "--config", str(ROOT / "conf/trainer/fsdp.yaml"), f"--trainer.accelerator={ACCELERATOR}",
        "--trainer.devices=1", f"--model.policy.name_or_path={model_dir}",
        "--model.selector=capo_lightning.selection.CAPOSelector", f"--trainer.default_root_dir={root}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_fsdp2_on_one_gpu_trains_and_resumes_from_its_sharded_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    _fit(model_dir, tmp_path, "--trainer.max_steps=2")
    first = time.perf_counter() - start
    last = tmp_path / "checkpoints/last.ckpt"
    assert last.is_dir() and list(last.glob("*.distcp")), "a distributed (sharded) checkpoint folder"
    _fit(model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last")
    rows = []
    for path in sorted((tmp_path / "logs").glob("version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(path.open()) if r.get("train/reward_mean")]
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3]  # the resumed run ran step 3 only
    for row in rows:
        assert math.isfinite(float(row["objective/loss"])) and math.isfinite(float(row["objective/grad_norm"]))
    print(f"\nFSDP2, one {ACCELERATOR}: 2 steps (with start-up) in {first:.1f} s")
