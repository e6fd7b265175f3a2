"""Validate the untrained policy once before the first step, so held-out curves start at the base
model."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class ValidateBeforeTraining(Callback):
    """Runs the validation loop when a fresh ``fit`` starts and logs it at step 0.

    Without it the first held-out number arrives after ``val_check_interval`` steps and a run cannot
    tell learning from a good base model. Unlike Lightning's sanity check (which it makes redundant:
    set ``num_sanity_val_steps: 0``), the results are logged like any validation (``val/*`` at
    ``step`` 0). A resumed run (``global_step > 0``) skips it. Training rollouts are unaffected:
    each step's sampling is seeded on its own, so the training rewards are the same with and without
    this baseline.

    How it runs the loop: there is no public "validate now" inside ``fit`` (``Trainer.validate``
    starts a run of its own: strategy setup, hooks, a fresh state). So it makes the call Lightning's
    training epoch loop makes when ``val_check_interval`` comes due,
    ``trainer.fit_loop.epoch_loop.val_loop.run()`` between ``trainer.validating = True`` and
    ``trainer.training = True``, reaching the loop only through public attributes. Lightning's own
    call also saves and restores ``trainer._logger_connector._first_loop_iter`` around it; this one
    does not need to (and so touches nothing private). That attribute says where the training epoch
    stands (None: no batch yet; True: its first batch; False: a later one), and the first batch of
    an epoch resets the accumulators of ``on_epoch`` training metrics. The validation loop leaves it
    None when it ends (``reset_results``), so a validation in the middle of an epoch must put back
    True or False, or the next training batch would reset the epoch's accumulated metrics. Here, in
    ``on_train_start``, no training batch has run: the attribute is None before the loop and None
    after it, the restore would be a no-op, and the training rows logged afterwards are those of a
    run without the baseline (``tests/integration/test_run_outputs.py``, including ``on_epoch``
    aggregates).
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate now unless resuming or validation is off."""
        if (
            trainer.global_step > 0
            or not trainer.enable_validation
            or trainer.limit_val_batches == 0
        ):
            return
        rank_zero_info("capo: validating the base policy before training (ValidateBeforeTraining)")
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
