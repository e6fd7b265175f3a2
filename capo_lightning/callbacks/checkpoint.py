"""Save a resumable checkpoint when a run is interrupted or crashes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from capo_lightning.callbacks.verified_checkpoint import CheckpointWriteError, commit


def collective_failed(exception: BaseException) -> bool:
    """Whether ``exception`` came out of a collective (a peer rank died, hung or was cut off): a
    ``torch.distributed`` error, or one raised with a ``torch.distributed`` call innermost (gloo
    raises a plain ``RuntimeError`` from ``work.wait()`` on a reset connection or a timeout)."""
    if isinstance(exception, dist.DistError):
        return True
    trace = exception.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and "torch/distributed/" in trace.tb_frame.f_code.co_filename


def lost_peer_message(trainer: Trainer, exception: BaseException) -> str:
    """What a surviving rank says when a collective failed: which rank it lost, where it can tell
    (of 2 ranks, the other one), and how to resume."""
    rank, world = trainer.global_rank, trainer.world_size
    others = [r for r in range(world) if r != rank]
    peer = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others} (see their logs)"
    first_line = (str(exception).splitlines() or [""])[0][:300]
    return (
        f"capo: rank {rank} lost {peer}: a collective failed at step {trainer.global_step} "
        f"({type(exception).__name__}: {first_line}). That rank died, hung past the "
        "process-group timeout or was cut off; the interrupt checkpoint needs every rank and is "
        "skipped. Resume the run's folder from its last periodic checkpoint: --ckpt_path last"
    )


class InterruptCheckpoint(Checkpoint):
    """On Ctrl-C or an exception during ``fit``, write ``<dirpath>/last-interrupted.ckpt``.

    The name matches Lightning's ``last*`` pattern, so ``--ckpt_path last`` resumes from it when it
    is the newest. Unlike Lightning's ``OnExceptionCheckpoint``, its presence does not make a plain
    ``capo fit`` (without ``--ckpt_path``) resume silently: resuming is always asked for.

    It saves only once training has run a step past where this process started (its first
    ``on_train_start``): an exception before then (while loading, restoring or setting up) would
    otherwise save an untrained or unrestored state as the newest ``last*`` checkpoint, which
    ``--ckpt_path last`` then resumes from, losing the run. A failed checkpoint write
    (:class:`.CheckpointWriteError`, a full disk) is not retried. The checkpoint is committed like
    :class:`.VerifiedCheckpoint`'s (written aside, hashed into the manifest, renamed into place).

    When the exception came out of a collective (a peer rank is lost: :func:`collective_failed`),
    nothing is saved: saving is itself collective (a sharded checkpoint needs every rank's shard,
    one file a barrier) and would fail again or wait out the process-group timeout once more. The
    rank says so on stderr, naming the rank it lost (:func:`lost_peer_message`).

    Args:
        dirpath: folder of the checkpoint; "" = ``<trainer.default_root_dir>/checkpoints`` (filled
            by the CLI).
    """

    FILENAME = "last-interrupted.ckpt"

    def __init__(self, dirpath: str = "") -> None:
        self.dirpath = dirpath
        self._started_at: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The step this process resumed at (0 for a new run): nothing before it is worth saving."""
        self._started_at = trainer.global_step

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Save the current state, whatever went wrong, unless a peer rank is lost."""
        if trainer.world_size > 1 and collective_failed(exception):
            print(lost_peer_message(trainer, exception), file=sys.stderr, flush=True)
            return
        if isinstance(exception, CheckpointWriteError):
            return  # the disk refused a checkpoint already: the error names it and what is intact
        if self._started_at is None or trainer.global_step <= self._started_at:
            rank_zero_info(
                f"capo: {type(exception).__name__} before a step was trained in this process; no "
                "interrupt checkpoint (the checkpoints already written are unchanged)"
            )
            return
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / self.FILENAME
        commit(trainer, path, keep_previous=False)
        rank_zero_info(
            f"capo: {type(exception).__name__} at step {trainer.global_step}; saved {path} "
            "(resume with --ckpt_path last)"
        )
