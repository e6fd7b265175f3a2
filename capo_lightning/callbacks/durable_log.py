"""Keep the metric log whole across a kill: no row lost between a checkpoint and its log."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

KEY = "capo_unlogged_step"
"""The checkpoint entry of a step saved before it was logged: its row, and whether a validation was
due after it (None for a checkpoint saved later)."""


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

    A validation due at that step runs after the checkpoint, and Lightning, resuming from it, skips
    it (its loop fast-forwards past a validation it believes done); a kill during that validation
    would lose its rows. So the checkpoint also says whether one was due, and the resumed run runs
    it first, as :class:`.ValidateBeforeTraining` runs its baseline (each validation's sampling is
    seeded on its own, so it gives the rows the killed process would have logged). A checkpoint
    saved during a validation (``InterruptCheckpoint``, when it fails) owes that validation too.
    """

    def __init__(self) -> None:
        self._unlogged = False  # the current step has ended but its row is not yet logged
        self._validating = False  # a validation inside training has started and not ended
        self._restored: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        self._unlogged = True  # Lightning logs the step after every on_train_batch_end hook

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        self._unlogged = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unlogged = False  # a validation inside training runs after the step is logged
        self._validating = trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validating = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, _: BaseException) -> None:
        self._unlogged = False  # SIGTERM stops after the step is logged

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            logger.save()
        step = None
        if self._unlogged and trainer.training:  # private, but Lightning's own row and val rule
            loop = trainer.fit_loop.epoch_loop
            step = {
                "row": convert_tensors_to_scalars(dict(trainer._logger_connector.metrics["log"])),
                "validation_due": loop._should_check_val_fx(trainer.fit_loop._data_fetcher),
            }
        elif self._validating:  # saved because the validation failed: it is owed, its rows unlogged
            step = {"row": None, "validation_due": True}
        checkpoint[KEY] = step

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._restored = checkpoint.get(KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._replay(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # resumed from the last step's checkpoint: training is skipped, on_train_start never runs
        self._replay(trainer)

    def _replay(self, trainer: Trainer) -> None:
        """Log the restored step's row, then run the validation it owes (once)."""
        step, self._restored = self._restored, None
        if not step:
            return
        if step["row"]:
            trainer._logger_connector.log_metrics(step["row"])  # as Lightning would have logged it
        if step["validation_due"]:
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.run()
            trainer.training = True
