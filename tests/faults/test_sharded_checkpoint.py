"""A sharded FSDP2 checkpoint is committed atomically and verified: 2 CPU ranks (gloo, Lightning's launcher), the
tiny model, a checkpoint folder after every step (``VerifiedCheckpoint``).

Rank 1 is killed (``CAPO_FAULT=checkpoint_shard:3:kill``, ``CAPO_FAULT_RANK=1``) once its shard of step 3's
checkpoint is on disk, before the checkpoint is committed: rank 0 stops at the commit's barrier, ``last.ckpt`` is
still step 2's folder and step 3's is left as ``last.ckpt.partial`` (before, each shard was written into
``last.ckpt`` itself, over the previous step's files). One shard of ``last.ckpt`` is then truncated: the resume with
``--ckpt_path last`` skips it, names it, resumes from ``last.previous.ckpt`` (step 1), clears the stale partial
folder before writing into it again, and ends with the weights of an uninterrupted 2-rank run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capo_lightning.callbacks.verified_checkpoint import PARTIAL, verify
from capo_lightning.commands.export import read_checkpoint
from capo_lightning.faults import RANK_VARIABLE, VARIABLE
from tests.faults.harness import soak
from tests.integration.test_launch import _fit_args, _overlay
from tests.integration.test_rank_death import _start, _wait

pytestmark = [pytest.mark.faults, pytest.mark.slow]
STEPS = 3


def _launch(model: Path, folder: Path, tmp_path: Path, tag: str, *extra: str) -> tuple[list[int | None], str]:
    argv = _fit_args(model, folder, tmp_path / f"{tag}-record", STEPS, *_overlay("fsdp", "lightning"), *extra)
    procs = _start("lightning", argv, tmp_path, tag)
    codes = _wait(procs, 400)
    return codes, "\n".join(log.read_text() for _, log in procs)


def test_a_kill_between_shards_commits_nothing_and_a_damaged_folder_falls_back(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes, log = _launch(tiny_model_dir, tmp_path / "reference", tmp_path, "reference")
    assert codes == [0], log[-3000:]
    want = read_checkpoint(tmp_path / "reference/checkpoints/last.ckpt")

    folder = tmp_path / "run"
    checkpoints = folder / "checkpoints"
    monkeypatch.setenv(VARIABLE, f"checkpoint_shard:{STEPS}:kill")
    monkeypatch.setenv(RANK_VARIABLE, "1")
    codes, log = _launch(tiny_model_dir, folder, tmp_path, "killed")
    assert codes[0] not in (0, None), log[-3000:]
    last, previous = checkpoints / "last.ckpt", checkpoints / "last.previous.ckpt"
    assert (checkpoints / f"last.ckpt{PARTIAL}").is_dir()  # step 3's, written, never committed
    assert last.is_dir() and verify(last)[0]["step"] == STEPS - 1
    assert verify(previous)[0]["step"] == STEPS - 2

    soak.damage(sorted(last.glob("*.distcp"))[0], "truncate")
    monkeypatch.delenv(VARIABLE)
    monkeypatch.delenv(RANK_VARIABLE)
    codes, log = _launch(tiny_model_dir, folder, tmp_path, "resumed", "--ckpt_path=last")
    assert codes == [0], log[-3000:]
    assert f"capo: not resuming from {last}: its content does not match the manifest" in log
    assert f"capo: resuming from {previous} (step {STEPS - 2}, verified)" in log
    got = read_checkpoint(last)
    assert got["global_step"] == want["global_step"] == STEPS
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], tensor), key
    assert not (checkpoints / f"last.ckpt{PARTIAL}").exists()
