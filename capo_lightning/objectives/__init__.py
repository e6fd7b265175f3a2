"""Policy-gradient objectives. Short names here work on the CLI: ``--model.objective=GRPO``."""

from capo_lightning.objectives.base import LossOutput, Normalizer, Objective
from capo_lightning.objectives.grpo import GRPO

__all__ = ["GRPO", "LossOutput", "Normalizer", "Objective"]
