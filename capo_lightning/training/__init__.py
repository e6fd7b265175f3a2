"""One training step on a rollout batch, outside the LightningModule: how the batch is cut
(:mod:`~capo_lightning.training.plan`), what runs on it (:mod:`~capo_lightning.training.pipeline`),
the non-finite-step guard (:mod:`~capo_lightning.training.guard`) and the step's metrics
(:mod:`~capo_lightning.training.step_metrics`)."""
