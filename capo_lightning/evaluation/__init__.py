"""Evaluation: one validation or test epoch's metrics per dataset (:mod:`~.evaluator`) from the
torchmetrics of :mod:`~.metrics` (mean@n, pass@k, maj@n)."""

from capo_lightning.evaluation.evaluator import Evaluator

__all__ = ["Evaluator"]
