"""The validation and test hooks of :class:`~capo_lightning.module.CAPOModule`, as a mixin.

Each epoch builds an :class:`~capo_lightning.evaluation.evaluator.Evaluator` for the stage's
datasets, grades every batch into it and logs its results when the epoch ends, at the row's
``step`` (optimizer steps done); a validation's wall-clock seconds are logged as ``time/val_s`` and
left out of the next training step's ``time/step_s``.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.evaluation.evaluator import Evaluator


class EvaluationHooks:
    """Lightning's validation and test hooks, for a LightningModule (listed before it in the bases)
    that provides ``eval_spec`` (the DataModule's
    :class:`~capo_lightning.data.eval_sets.EvalSpec`: names and samples of the sets) and ``_clock``
    (a :class:`~capo_lightning.training.step_metrics.StepClock`)."""

    def on_validation_epoch_start(self) -> None:
        self._evaluator = self._make_evaluator("val")
        self._clock.validation_started()

    def on_test_epoch_start(self) -> None:
        self._evaluator = self._make_evaluator("test")

    def validation_step(self, batch: RolloutBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Grade the sampled completions: accuracy, pass@k and maj@n per dataset
        (see :mod:`evaluation`)."""
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: RolloutBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Same as validation, logged under ``test/``."""
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        seconds = self._clock.validation_ended()
        self.log(keys.TIME_VAL, seconds, sync_dist=self.trainer.world_size > 1)
        self._end_eval()

    def on_test_epoch_end(self) -> None:
        self._end_eval()

    def _end_eval(self) -> None:
        results = self._evaluator.compute()  # torchmetrics already synchronised the ranks
        self.log_dict(results)
        # the values agree on every rank; syncing only quiets Lightning
        sync = self.trainer.world_size > 1
        # the row's step: optimizer steps done
        self.log("step", float(self.global_step), sync_dist=sync)
        self.log(
            "acc",
            results[f"{self._evaluator.stage}/accuracy"],
            prog_bar=True,
            logger=False,
            sync_dist=sync,
        )
        rank_zero_info(self._evaluator.summary(results, self.global_step))

    def _make_evaluator(self, stage: str) -> Evaluator:
        return Evaluator(stage, self.eval_spec.names(stage), self.eval_spec.samples, self.device)

    def _eval_step(self, batch: RolloutBatch, dataloader_idx: int) -> None:
        self._evaluator.update(batch, dataloader_idx)
        self.log_dict(
            self._evaluator.batch_metrics(batch, dataloader_idx),
            batch_size=batch.num_completions,
            sync_dist=self.trainer.world_size > 1,
            on_epoch=True,
            on_step=False,
            add_dataloader_idx=False,
        )
