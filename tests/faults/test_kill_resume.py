"""SIGKILL at every injection point, then ``--ckpt_path last`` until done: nothing lost, nothing doubled.

Real ``capo fit`` processes on the tiny model (``conf/debug/tiny_cpu.yaml`` with CAPO's selector, 4 steps, a
checkpoint after every step). An uninterrupted reference run is traced (``CAPO_FAULT_TRACE``) to learn how often it
reaches each point; each case then kills a run at a seeded arrival of one point (``CAPO_FAULT=<point>:<n>:kill``,
``SIGKILL`` from inside, which nothing can catch) and resumes it from ``last`` until it finishes. Asserted against
the reference, bitwise: the final weights, AdamW state, lr schedule, selector state (in the state dict), the data
position and counters; the training and validation metrics of the joined log (``capo report``'s view of all
versions), every key but ``time/*`` and throughput, each step exactly once.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from capo_lightning import keys
from capo_lightning.callbacks import InterruptCheckpoint
from capo_lightning.commands.cli import PREEMPTED_EXIT, PREEMPTED_MESSAGE
from capo_lightning.faults import POINTS, TRACE_VARIABLE, VARIABLE
from capo_lightning.report.runs import load_run
from tests.conftest import ROOT

pytestmark = pytest.mark.faults

STEPS = 4
SEED = 20261207
def _timed(key: str) -> bool:
    """Timings, throughput and grader latencies: measured, so never equal between two runs."""
    return key.startswith("time/") or key == keys.TOKENS_PER_S or "latency_ms" in key
KILLED = -9  # a process killed by SIGKILL, as subprocess reports it


def _fit(
    root: Path, model_dir: Path, env: dict[str, str], resume: bool = False, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "capo_lightning", "fit", "--config", str(ROOT / "conf/debug/tiny_cpu.yaml"),
        "--config", str(ROOT / "conf/selector/capo.yaml"), f"--model.policy.name_or_path={model_dir}",
        f"--trainer.max_steps={STEPS}", f"--trainer.default_root_dir={root}",
        "--trainer.val_check_interval=2", "--trainer.check_val_every_n_epoch=null",
        *extra,
    ] + (["--ckpt_path", "last"] if resume else [])  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if k not in (VARIABLE, TRACE_VARIABLE)} | env
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def _state(root: Path, name: str = "last.ckpt") -> dict:
    checkpoint = torch.load(root / "checkpoints" / name, weights_only=False, map_location="cpu")
    datamodule = {k: v for k, v in checkpoint.items() if "DataModule" in k}
    assert datamodule, f"no data position in the checkpoint: {sorted(checkpoint)}"
    return {
        "state_dict": checkpoint["state_dict"], "optimizer": checkpoint["optimizer_states"],
        "schedulers": checkpoint["lr_schedulers"], "capo": checkpoint["capo_state"], "data": datamodule,
        "global_step": checkpoint["global_step"],
    }  # fmt: skip


def _rows(root: Path) -> list[dict[str, float]]:
    rows = [{k: v for k, v in row.items() if not _timed(k)} for row in load_run(root).rows]
    # in step order; rows of one step (training, validation) by their keys: a resumed version may log a step's
    # training row after the validation row the earlier version kept
    return sorted(rows, key=lambda row: (row.get("step", -1.0), sorted(row)))


def _assert_equal(got, want, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_equal(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_equal(a, b, f"{where}[{i}]")
    else:
        assert got == want or (got != got and want != want), f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    trace = root / "trace.txt"
    proc = _fit(root, tiny_model_dir, {TRACE_VARIABLE: str(trace)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"state": _state(root), "rows": _rows(root), "arrivals": Counter(trace.read_text().split())}


@pytest.mark.parametrize(
    "point", POINTS)
def test_sigkill_at_a_point_then_resume_from_last_ends_as_the_uninterrupted_run(
    point: str, reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    arrivals = reference["arrivals"][point]
    assert arrivals > 0, f"the reference run never reached {point}: {reference['arrivals']}"
    n = random.Random(f"{SEED}:{point}").randint(1, arrivals)
    killed = _fit(tmp_path, tiny_model_dir, {VARIABLE: f"{point}:{n}:kill"})
    assert killed.returncode == KILLED, f"{point}:{n} did not kill the run (rc {killed.returncode})"
    for _attempt in range(3):  # one resume finishes; more would mean a checkpoint that resumes nowhere
        resumed = _fit(tmp_path, tiny_model_dir, {}, resume=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        if _state(tmp_path)["global_step"] == STEPS:
            break
    _assert_equal(_state(tmp_path), reference["state"], point)
    rows = _rows(tmp_path)
    steps = [(row.get("step"), sorted(row)[0]) for row in rows]
    wanted = [(row.get("step"), sorted(row)[0]) for row in reference["rows"]]
    assert steps == wanted, f"{point}:{n}: rows (step, first key) {steps}, wanted {wanted}"
    for got, want in zip(rows, reference["rows"], strict=True):
        _assert_equal(got, want, f"{point}:{n} row step {want.get('step')}")


def test_sigterm_finishes_the_step_saves_it_and_exits_143_then_resumes_exactly(
    reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Preemption: SIGTERM during a step (here in a backward of steps 1..3) lets that step finish and be logged,
    InterruptCheckpoint saves it, and capo exits with 143 (non-zero: a scheduler requeues it, docs/reliability.md)."""
    per_step = reference["arrivals"]["backward"] // STEPS
    n = random.Random(f"{SEED}:term").randint(1, per_step * (STEPS - 1))
    interrupt = ("--trainer.callbacks+=capo_lightning.callbacks.InterruptCheckpoint",)
    stopped = _fit(tmp_path, tiny_model_dir, {VARIABLE: f"backward:{n}:term"}, extra=interrupt)
    assert stopped.returncode == PREEMPTED_EXIT, stopped.stderr[-3000:]
    assert PREEMPTED_MESSAGE in stopped.stderr and "Traceback" not in stopped.stderr
    saved = _state(tmp_path, InterruptCheckpoint.FILENAME)
    assert saved["global_step"] == -(-n // per_step), f"backward {n} is in step {-(-n // per_step)}"
    resumed = _fit(tmp_path, tiny_model_dir, {}, resume=True, extra=interrupt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_equal(_state(tmp_path), reference["state"], "term")
    rows = _rows(tmp_path)
    assert [r.get("step") for r in rows] == [r.get("step") for r in reference["rows"]]
    for got, want in zip(rows, reference["rows"], strict=True):
        _assert_equal(got, want, f"term row step {want.get('step')}")
