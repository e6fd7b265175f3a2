"""Preemption: SIGTERM (a scheduler taking the node back) and SLURM's requeue signal (SIGUSR1, sent
ahead of the time limit when the job asks for it: ``#SBATCH --signal=USR1@600``).

Either way the step under way finishes and is logged, ``InterruptCheckpoint`` (when configured)
saves it, and ``capo`` exits non-zero, so the run is not recorded as completed:

* SIGTERM: status 143 (128 + SIGTERM, what a shell reports for a process SIGTERM ended). SLURM
  (``--requeue``, preemption), torchrun's ``--max-restarts`` and a Kubernetes restart policy then
  requeue or restart it; 0 would record a preempted run as completed.
* SIGUSR1: the same stop, then rank 0 of a SLURM job asks SLURM to requeue it (``scontrol requeue
  <job>``: the time limit would end the job, not requeue it) and ``capo`` exits 138 (128 + SIGUSR1).

Lightning's own SLURM requeue handler is not used: it saves ``hpc_ckpt_<n>.ckpt`` from inside the
signal handler, wherever the step is (mid-backward, between optimizer and counter), into a file
``--ckpt_path last`` never picks. Installing this handler first keeps Lightning from installing its
own (it leaves a signal that already has one alone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType
from typing import NoReturn

REQUEUE_SIGNAL = signal.SIGUSR1
PREEMPTED_EXIT = 128 + signal.SIGTERM
REQUEUE_EXIT = 128 + REQUEUE_SIGNAL
PREEMPTED_MESSAGE = (
    "capo: stopped by SIGTERM (preempted) after finishing and logging the step under way; "
    "resume with --ckpt_path last"
)
_requeue_asked = False


def install() -> None:
    """SIGUSR1 becomes a SIGTERM to this process, remembered, so Lightning's graceful stop runs."""

    def stop_for_requeue(signum: int, frame: FrameType | None) -> None:
        global _requeue_asked
        _requeue_asked = True
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(REQUEUE_SIGNAL, stop_for_requeue)


def exit_preempted() -> NoReturn:
    """After Lightning stopped for SIGTERM: say so, requeue a SLURM job if SIGUSR1 asked, exit."""
    if not _requeue_asked:
        print(PREEMPTED_MESSAGE, file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
    print(
        f"capo: stopped by SIGUSR1 (SLURM's requeue signal) after finishing and logging the step "
        f"under way; {_requeue()}; the requeued command resumes with --ckpt_path last",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(REQUEUE_EXIT)


def _requeue() -> str:
    """Rank 0 of a SLURM job runs ``scontrol requeue <job>``; what happened, in words."""
    job = os.environ.get("SLURM_JOB_ID")
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    if job is None:
        return "not in a SLURM job (no SLURM_JOB_ID): requeue it yourself"
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return f"rank 0 asks SLURM to requeue job {job}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"scontrol not found: requeue job {job} yourself"
    if result.returncode == 0:
        return f"asked SLURM to requeue job {job}"
    said = (result.stderr or result.stdout).strip() or f"status {result.returncode}"
    return f"'scontrol requeue {job}' failed ({said}): requeue it yourself"
