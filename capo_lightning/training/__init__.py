"""One training step on a rollout batch, outside the LightningModule: how the batch is cut
(:mod:`~capo_lightning.training.plan`), the step's named schedules
(:mod:`~capo_lightning.training.schedules`) and what they are built from
(:mod:`~capo_lightning.training.parts`), the non-finite-step guard
(:mod:`~capo_lightning.training.guard`), the step's metrics
(:mod:`~capo_lightning.training.step_metrics`) and the optimizer and lr schedule a run builds
(:mod:`~capo_lightning.training.optim`)."""
