"""Save a resumable checkpoint when a run is interrupted or crashes."""

from __future__ import annotations

from pathlib import Path

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info


class InterruptCheckpoint(Checkpoint):
    """On Ctrl-C or an exception during ``fit``, write ``<dirpath>/last-interrupted.ckpt``.

    The name matches Lightning's ``last*`` pattern, so ``--ckpt_path last`` resumes from it when it
    is the newest. Unlike Lightning's ``OnExceptionCheckpoint``, its presence does not make a plain
    ``capo fit`` (without ``--ckpt_path``) resume silently: resuming is always asked for.

    Args:
        dirpath: folder of the checkpoint; "" = ``<trainer.default_root_dir>/checkpoints`` (filled
            by the CLI).
    """

    FILENAME = "last-interrupted.ckpt"

    def __init__(self, dirpath: str = "") -> None:
        self.dirpath = dirpath

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Save the current state, whatever went wrong."""
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / self.FILENAME
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"capo: {type(exception).__name__} at step {trainer.global_step}; saved {path} "
            "(resume with --ckpt_path last)"
        )
