"""Damaged, half-written and unwritable checkpoints: never loaded silently, never the end of a run.

Real ``capo fit`` processes (the fault soak's harness, ``VerifiedCheckpoint`` from ``conf/debug/tiny_cpu.yaml``,
a checkpoint after every step); each case is compared with the uninterrupted reference run, bitwise:

- ``last.ckpt`` truncated, or one byte of it flipped (same size): ``--ckpt_path <it>`` is refused, naming it and its
  previous one; ``--ckpt_path last`` says it skips it, resumes from ``last.previous.ckpt`` and ends as the reference;
- both damaged: the resume stops with an error naming each, trains nothing and leaves both files as they were;
- a full disk while step 3's checkpoint is written (a SIMULATION: ``CAPO_FAULT=checkpoint_write:3:enospc`` raises
  ``OSError(ENOSPC)`` as the checkpoint is gathered): the run stops with an error naming ``last.ckpt``, step 2's
  checkpoint verifies, no interrupt checkpoint is attempted, and the resume ends as the reference;
- an exception in a resumed run before it trains a step (``generation:1:raise``) writes no interrupt checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from capo_lightning.callbacks.verified_checkpoint import MANIFEST, verify
from capo_lightning.commands.export import read_checkpoint
from capo_lightning.faults import VARIABLE
from tests.faults.harness import STEPS, assert_same_as_reference, output, run, soak

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("how", [pytest.param("truncate", marks=pytest.mark.slow), "flip"])
def test_a_damaged_last_is_refused_by_name_and_last_resumes_from_the_previous(
    how: str, reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "run"  # killed in the last step: its previous two checkpointed
    assert run(root, tiny_model_dir, {VARIABLE: f"optimizer_step:{STEPS}:kill"}) == soak.KILLED
    folder = root / "checkpoints"
    last, previous = folder / "last.ckpt", folder / "last.previous.ckpt"
    assert verify(last)[0]["step"] == STEPS - 1 and verify(previous)[0]["step"] == STEPS - 2
    soak.damage(last, how)
    assert verify(last) == (None, "its content does not match the manifest (truncated or corrupted)")

    assert run(root, tiny_model_dir, resume=str(last)) != 0
    assert f"--ckpt_path {last}: its content does not match the manifest" in output(root)
    assert f"Its previous one is {previous}" in output(root)

    assert run(root, tiny_model_dir, resume=True) == 0, output(root)[-3000:]
    assert f"capo: not resuming from {last}" in output(root)
    assert f"capo: resuming from {previous} (step {STEPS - 2}, verified) instead of {last}" in output(root)
    assert_same_as_reference(root, reference, how)
    assert verify(last)[0]["step"] == STEPS and verify(previous)[0]["step"] == STEPS - 1  # good ones again


@pytest.mark.slow
def test_when_no_checkpoint_verifies_the_resume_stops_naming_each(tiny_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert run(root, tiny_model_dir, steps=2) == 0, output(root)[-3000:]
    folder = root / "checkpoints"
    soak.damage(folder / "last.ckpt", "truncate")
    soak.damage(folder / "last.previous.ckpt", "flip")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert run(root, tiny_model_dir, resume=True, steps=3) != 0
    assert f"no checkpoint in {folder} verifies against {MANIFEST}: " in output(root)
    for name in ("last.ckpt", "last.previous.ckpt"):
        assert f"{name}: its content does not match the manifest" in output(root)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing trained, nothing overwritten


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_and_names_the_path(
    reference: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIMULATED full disk (an injected ENOSPC), at step 3's checkpoint."""
    root = tmp_path / "run"
    code = run(root, tiny_model_dir, {VARIABLE: "checkpoint_write:3:enospc"}, interrupt=True)
    assert code not in (0, soak.KILLED), output(root)[-3000:]
    last = root / "checkpoints/last.ckpt"
    assert f"capo: writing the checkpoint {last} failed (OSError: [Errno 28] No space left" in output(root)
    assert verify(last)[0]["step"] == 2 and read_checkpoint(last)["global_step"] == 2
    assert not (root / "checkpoints/last-interrupted.ckpt").exists()  # the disk is full: no second attempt
    assert run(root, tiny_model_dir, resume=True, interrupt=True) == 0, output(root)[-3000:]
    assert_same_as_reference(root, reference, "enospc")


@pytest.mark.slow
def test_an_exception_before_a_resumed_run_trains_writes_no_interrupt_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """It would be the newest ``last*`` file, so ``--ckpt_path last`` would take it over the periodic one."""
    root = tmp_path / "run"
    assert run(root, tiny_model_dir, steps=2) == 0, output(root)[-3000:]
    assert run(root, tiny_model_dir, {VARIABLE: "generation:1:raise"}, resume=True, interrupt=True) != 0
    assert "InjectedFault before a step was trained in this process; no interrupt checkpoint" in output(root)
    assert not (root / "checkpoints/last-interrupted.ckpt").exists()
