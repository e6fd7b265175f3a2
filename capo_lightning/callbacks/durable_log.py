"""Keep the metric log whole across a kill: no row lost between a checkpoint and its log."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

KEY = "capo_unlogged_row"
"""The checkpoint entry holding the row of a step saved before it was logged (None otherwise)."""


class DurableLog(Callback):
    """A step's log row travels with its checkpoint until a logger has it.

    Lightning saves a step's periodic checkpoint (``ModelCheckpoint``, in ``on_train_batch_end``)
    before it hands that step's metrics to the loggers, and ``CSVLogger`` writes its file every 100
    steps. A process killed in between resumes after the step, and no logger ever gets its row: the
    joined log (:mod:`capo_lightning.report.versions`) misses it. So, whenever a checkpoint is
    saved, every logger first writes what it holds, and the checkpoint keeps the step's own row if
    it is not logged yet; the resumed run logs that row first. Its new log version then starts at
    that step and replaces what the killed process may have written from there on, so the joined
    log has every step once. ``capo fit`` adds this callback to every run.
    """

    def __init__(self) -> None:
        self._unlogged = False  # the current step has ended but its row is not yet logged
        self._restored: dict[str, float] | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        self._unlogged = True  # Lightning logs the step after every on_train_batch_end hook

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        self._unlogged = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unlogged = False  # a validation inside training runs after the step is logged

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, _: BaseException) -> None:
        self._unlogged = False  # SIGTERM stops after the step is logged

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            logger.save()
        row = None
        if self._unlogged and trainer.training:
            row = convert_tensors_to_scalars(dict(trainer._logger_connector.metrics["log"]))
        checkpoint[KEY] = row

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._restored = checkpoint.get(KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        row, self._restored = self._restored, None
        if row:
            trainer._logger_connector.log_metrics(row)  # as Lightning would have logged it
