"""SIGKILL at every injection point, SIGTERM and SLURM's SIGUSR1, then ``--ckpt_path last``: nothing lost or doubled.

The fault soak's cases as tests (``scripts/fault_soak.py``, whose harness it uses): real ``capo fit`` processes on
the tiny model (``conf/debug/tiny_cpu.yaml`` with CAPO's selector, 4 steps, a checkpoint after every step,
validation every 2 steps). An uninterrupted reference run is traced (``CAPO_FAULT_TRACE``) to learn how often it
reaches each point; each case then kills a run at a seeded arrival of one point (``CAPO_FAULT=<point>:<n>:kill``,
``SIGKILL`` from inside, which nothing can catch) and resumes it from ``last`` until it finishes. Asserted against
the reference, bitwise: the final weights, AdamW state, lr schedule, selector state (in the state dict), the data
position and counters; the training and validation rows of the joined log (``capo report``'s view of all
versions), every key but timings, each step exactly once. The default suite runs the kill at ``checkpoint_shard``
and SIGUSR1 (with test_checkpoints.py's flipped bit and full disk: the CI subset, ~3 min); the rest is marked
``slow`` (all: ``pytest -m faults``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from capo_lightning.callbacks import InterruptCheckpoint
from capo_lightning.commands.preemption import PREEMPTED_EXIT, PREEMPTED_MESSAGE, REQUEUE_EXIT
from capo_lightning.faults import RUN_POINTS, VARIABLE
from tests.faults.harness import SEED, STEPS, soak
from tests.faults.harness import assert_same_as_reference as _assert_same_as_reference
from tests.faults.harness import output as _output
from tests.faults.harness import run as _run

pytestmark = pytest.mark.faults


# the grader point is in the grading server, whose death the run survives (tests/integration/test_ungraded.py)
@pytest.mark.parametrize(
    "point", [p if p == "checkpoint_shard" else pytest.param(p, marks=pytest.mark.slow) for p in RUN_POINTS]
)
def test_sigkill_at_a_point_then_resume_from_last_ends_as_the_uninterrupted_run(
    point: str, reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    arrivals = reference["arrivals"][point]
    assert arrivals > 0, f"the reference run never reached {point}: {reference['arrivals']}"
    n = random.Random(f"{SEED}:{point}").randint(1, arrivals)
    root = tmp_path / "run"
    assert _run(root, tiny_model_dir, {VARIABLE: f"{point}:{n}:kill"}) == soak.KILLED, f"{point}:{n} did not kill"
    assert _run(root, tiny_model_dir, resume=True) == 0, _output(root)[-3000:]  # one resume finishes the run
    _assert_same_as_reference(root, reference, f"{point}:{n}")


@pytest.mark.slow
def test_a_kill_during_the_validation_after_a_checkpoint_loses_no_validation_row(
    reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Step 2's checkpoint is saved before the validation due at step 2 runs, and Lightning, resuming from it, skips
    that validation; killed in it (its generation is the run's third: steps 1, 2, then the validation), the run
    must redo it on resume (DurableLog), or the joined log lacks its rows."""
    root = tmp_path / "run"
    assert _run(root, tiny_model_dir, {VARIABLE: "generation:3:kill"}) == soak.KILLED
    assert soak.final_state(root)["global_step"] == 2  # killed after step 2's checkpoint, before step 3
    assert _run(root, tiny_model_dir, resume=True) == 0, _output(root)[-3000:]
    _assert_same_as_reference(root, reference, "generation:3 (validation)")


@pytest.mark.slow
def test_a_kill_after_the_last_steps_checkpoint_still_logs_that_step_on_resume(
    reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Killed in the last step's weight sync, after its checkpoint: the resumed run has no step left to train
    (Lightning skips training and on_train_start), yet must log that step's row and its validation."""
    root = tmp_path / "run"
    assert _run(root, tiny_model_dir, {VARIABLE: f"weight_sync:{STEPS}:kill"}) == soak.KILLED
    assert soak.final_state(root)["global_step"] == STEPS
    assert _run(root, tiny_model_dir, resume=True) == 0, _output(root)[-3000:]
    _assert_same_as_reference(root, reference, "weight_sync at the last step")


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_it_and_exits_143_then_resumes_exactly(
    reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Preemption: SIGTERM during a step (here in a backward of steps 1..3) lets that step finish and be logged,
    InterruptCheckpoint saves it, and capo exits with 143 (non-zero: a scheduler requeues it, docs/scaling.md)."""
    per_step = reference["arrivals"]["backward"] // STEPS
    n = random.Random(f"{SEED}:term").randint(1, per_step * (STEPS - 1))
    root = tmp_path / "run"
    assert _run(root, tiny_model_dir, {VARIABLE: f"backward:{n}:term"}, interrupt=True) == PREEMPTED_EXIT
    assert PREEMPTED_MESSAGE in _output(root) and "Traceback" not in _output(root)
    saved = soak.final_state(root, InterruptCheckpoint.FILENAME)
    assert saved["global_step"] == -(-n // per_step), f"backward {n} is in step {-(-n // per_step)}"
    assert _run(root, tiny_model_dir, resume=True, interrupt=True) == 0, _output(root)[-3000:]
    _assert_same_as_reference(root, reference, "term")


@pytest.mark.slow
@pytest.mark.parametrize("n", [4, 3], ids=["in_a_step", "in_a_validation"])
def test_an_engine_that_raises_stops_the_run_with_a_resumable_checkpoint(
    n: int, reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The engine raising at the run's n-th generation (1 and 2: steps 1 and 2, 3: step 2's validation, 4: step 3):
    the run stops (exit 1, the error and the checkpoint named), InterruptCheckpoint saves step 2, the resume ends as
    the reference. No retry: an engine that raised once is not trusted with the next step's weights (documented).
    Raised inside the validation, the checkpoint is saved from within it and Lightning, resuming, skips that
    validation: the soak found its rows missing from the joined log (8 of 9); the checkpoint now says the validation
    is owed, and the resume runs it first."""
    root = tmp_path / "run"
    assert _run(root, tiny_model_dir, {VARIABLE: f"generation:{n}:raise"}, interrupt=True) == 1
    assert "capo: InjectedFault at step 2; saved" in _output(root) and "last-interrupted.ckpt" in _output(root)
    assert soak.final_state(root, InterruptCheckpoint.FILENAME)["global_step"] == 2
    assert _run(root, tiny_model_dir, resume=True, interrupt=True) == 0, _output(root)[-3000:]
    _assert_same_as_reference(root, reference, f"engine raised at generation {n}")


def test_slurms_requeue_signal_finishes_the_step_saves_it_requeues_the_job_and_exits_138(
    reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGUSR1 (``#SBATCH --signal=USR1@600``) in a backward of steps 1..3: the step finishes and is saved as on
    SIGTERM, then rank 0 runs ``scontrol requeue <job>`` and capo exits 138. ``scontrol`` here is a FAKE (a script
    on PATH that records its arguments): there is no SLURM on this machine."""
    per_step = reference["arrivals"]["backward"] // STEPS
    n = random.Random(f"{SEED}:requeue").randint(1, per_step * (STEPS - 1))
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    root = tmp_path / "run"
    code = _run(root, tiny_model_dir, {VARIABLE: f"backward:{n}:requeue", **slurm}, interrupt=True)
    assert code == REQUEUE_EXIT, _output(root)[-3000:]
    assert "capo: stopped by SIGUSR1 (SLURM's requeue signal)" in _output(root)
    assert "asked SLURM to requeue job 4242" in _output(root) and "Traceback" not in _output(root)
    assert calls.read_text() == "requeue 4242\n"
    saved = soak.final_state(root, InterruptCheckpoint.FILENAME)
    assert saved["global_step"] == -(-n // per_step), f"backward {n} is in step {-(-n // per_step)}"
    assert not list(root.glob("hpc_ckpt_*.ckpt"))  # not Lightning's mid-step save
    assert _run(root, tiny_model_dir, resume=True, interrupt=True) == 0, _output(root)[-3000:]
    _assert_same_as_reference(root, reference, "requeue")


def test_the_comparison_sees_a_difference() -> None:
    """The harness's comparison is not vacuous: it reports a changed bit, a missing row and a NaN only on one side."""
    import torch

    a = {"w": torch.tensor([1.0, 2.0]), "rows": [{"step": 1.0, "x": float("nan")}]}
    assert soak.differences(a, a) == []
    b = {"w": torch.tensor([1.0, 2.0 + 2**-20]), "rows": [{"step": 1.0, "x": float("nan")}]}
    assert soak.differences(b, a) == ["/w"]
    assert soak.differences({"w": a["w"], "rows": []}, a) == ["/rows: length 0 != 1"]
    assert soak.differences({"w": a["w"], "rows": [{"step": 1.0, "x": 0.0}]}, a) == ["/rows[0]/x: 0.0 != nan"]
