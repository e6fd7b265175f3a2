"""The command-line side: ``capo fit/validate/test`` (:mod:`~.cli`), ``capo export``
(:mod:`~.export`), the regimes stacked on a config (:mod:`~.regime`) and W&B from a config
(:mod:`~.wandb_config`). ``capo report`` lives in :mod:`capo_lightning.report`, which reads files
only."""
