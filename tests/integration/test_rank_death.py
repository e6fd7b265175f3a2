"""A rank that dies does not hang the others: ``capo fit`` of 2 CPU processes (gloo) whose rank 1 kills itself
with SIGKILL at the start of step 3, after steps 1 and 2 were checkpointed (``last.ckpt``, every step).

- killed (SIGKILL) under two torchrun agents (``conf/trainer/fsdp.yaml``) and under Lightning's own launcher (rank 1
  a child of rank 0): its sockets close, so rank 0's next collective fails at once; frozen (SIGSTOP, sockets open,
  as a lost node) under torchrun with ``conf/trainer/ddp.yaml`` (marked slow): rank 0 waits out the process-group
  timeout, ``PG_TIMEOUT`` here. Either way rank 0 exits non-zero within ``DEATH_TIMEOUT_S`` of the death and
  prints that it lost rank 1. Before ``InterruptCheckpoint`` skipped its save on a failed collective, the killed
  runs failed as fast but with a second traceback from the save (an FSDP2 checkpoint's broadcast to the dead rank);
  with a frozen rank the save's own collectives would wait on it again (not measured);
- ``InterruptCheckpoint`` does not hang trying to save a sharded checkpoint that needs the dead rank: it says it
  skipped the save;
- the same launch with ``--ckpt_path last`` resumes from step 2's checkpoint and runs step 3 only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from capo_lightning.commands.export import read_checkpoint
from tests.conftest import ROOT
from tests.integration.test_launch import LAUNCHERS, _fit_args, _free_port, _overlay, _train_rows

DIE_AT_STEP = 2  # global_step at which rank 1 dies: steps 1 and 2 are done and checkpointed
PG_TIMEOUT = "0:00:30"  # the process-group timeout the launches get
DEATH_TIMEOUT_S = 120  # what the survivors may take, from rank 1's death to their exit


class DieOnRank1(L.Callback):
    """Rank 1 sends itself ``how`` when step ``DIE_AT_STEP + 1`` starts: "KILL" (dead, its sockets closed by the
    kernel: the peers' next collective fails at once) or "STOP" (frozen, sockets open: a lost node or a hung
    process, which only the process-group timeout ends). The time is written to ``stamp`` first."""

    def __init__(self, stamp: str, how: str = "KILL") -> None:
        self.stamp, self.how = Path(stamp), how

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == 1 and trainer.global_step == DIE_AT_STEP:
            self.stamp.write_text(str(time.time()))
            os.kill(os.getpid(), getattr(signal, f"SIG{self.how}"))


def _start(launcher: str, argv: list[str], logs: Path, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    start, count = LAUNCHERS[launcher]
    port, procs = _free_port(), []
    for rank in range(count):
        command, env = start(rank, port, argv)
        log = logs / f"{tag}-rank{rank}.log"
        with log.open("w") as file:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=file, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append((proc, log))
    return procs


def _wait(procs: list[tuple[subprocess.Popen, Path]], timeout: float) -> list[int | None]:
    """Each process's exit code, None for one still running after ``timeout`` seconds (then killed)."""
    deadline = time.monotonic() + timeout
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    codes = [proc.poll() for proc, _ in procs]
    for proc, _ in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return codes


@pytest.mark.parametrize(
    "launcher, trainer, how",
    [
        pytest.param("torchrun", "fsdp", "KILL", id="torchrun-fsdp-killed"),
        pytest.param("lightning", "fsdp", "KILL", id="lightning-fsdp-killed"),
        # waits out the 30 s process-group timeout: ~70 s on a loaded 2-core machine
        pytest.param("torchrun", "ddp", "STOP", id="torchrun-ddp-frozen", marks=pytest.mark.slow),
    ],
)
def test_a_dead_rank_stops_the_others_and_the_run_resumes(
    tiny_model_dir: Path, tmp_path: Path, launcher: str, trainer: str, how: str
) -> None:
    folder, record, stamp = tmp_path / "run", tmp_path / "env", tmp_path / "death"
    overlay = [*_overlay(trainer, launcher), f"--trainer.strategy.init_args.timeout={PG_TIMEOUT}"]
    callbacks = [
        f"--trainer.callbacks+={__name__}.DieOnRank1", f"--trainer.callbacks.init_args.stamp={stamp}",
        f"--trainer.callbacks.init_args.how={how}",
        "--trainer.callbacks+=capo_lightning.callbacks.InterruptCheckpoint",
    ]  # fmt: skip
    procs = _start(launcher, _fit_args(tiny_model_dir, folder, record, 4, *overlay, *callbacks), tmp_path, "die")
    started = time.monotonic()
    survivor, _ = procs[0]  # rank 0, or the agent that started it
    try:
        survivor.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pass
    ended = time.time()
    codes = _wait(procs, 0 if how == "STOP" else 30)  # a frozen rank 1 (and its agent) never ends by itself
    logs = [log.read_text() for _, log in procs]
    print(f"{launcher} {how}: codes {codes}, {time.monotonic() - started:.0f} s")
    assert stamp.exists(), "rank 1 never reached the step it dies at"
    assert codes[0] not in (0, None), (codes, logs[0][-3000:])
    assert ended - float(stamp.read_text()) < DEATH_TIMEOUT_S, logs[0][-3000:]
    assert "capo: rank 0 lost rank 1: a collective failed at step 2" in logs[0], logs[0][-3000:]
    assert "last-interrupted" not in " ".join(p.name for p in (folder / "checkpoints").iterdir())
    assert read_checkpoint(folder / "checkpoints/last.ckpt")["global_step"] == DIE_AT_STEP

    # the same launch resumes from step 2's checkpoint: only step 3 runs
    procs = _start(launcher, _fit_args(tiny_model_dir, folder, record, 3, *_overlay(trainer, launcher),
                                       "--ckpt_path=last"), tmp_path, "resume")  # fmt: skip
    codes = _wait(procs, 400)
    assert codes == [0] * len(procs), [log.read_text()[-3000:] for _, log in procs]
    # the resumed launch's own log: step 2's row again (saved in its checkpoint before it was logged: DurableLog)
    assert [r["step"] for r in _train_rows(folder)] == [2.0, 3.0]
    assert read_checkpoint(folder / "checkpoints/last.ckpt")["global_step"] == 3
