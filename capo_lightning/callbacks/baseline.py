"""Validate the untrained policy once before the first step, so held-out curves start at the base model."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class ValidateBeforeTraining(Callback):
    """Runs the validation loop when a fresh ``fit`` starts and logs it at step 0.

    Without it the first held-out number arrives after ``val_check_interval`` steps and a run cannot tell
    learning from a good base model. Unlike Lightning's sanity check (which it makes redundant: set
    ``num_sanity_val_steps: 0``), the results are logged like any validation (``val/*`` at ``step`` 0).
    A resumed run (``global_step > 0``) skips it. Training rollouts are unaffected: each step's sampling
    is seeded on its own, so the training rewards are the same with and without this baseline.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate now unless resuming or validation is off."""
        loop = trainer.fit_loop.epoch_loop.val_loop
        if trainer.global_step > 0 or not trainer.enable_validation or trainer.limit_val_batches == 0:
            return
        rank_zero_info("capo: validating the base policy before training (ValidateBeforeTraining)")
        first_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_iter
