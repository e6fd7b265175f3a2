"""Policy-gradient objectives. Short names here work on the CLI: ``--model.objective=DAPO``."""

from capo_lightning.objectives.base import LossOutput, Normalizer, Objective
from capo_lightning.objectives.dapo import DAPO
from capo_lightning.objectives.dr_grpo import DrGRPO
from capo_lightning.objectives.grpo import GRPO
from capo_lightning.objectives.reinforce import REINFORCE

__all__ = ["DAPO", "GRPO", "REINFORCE", "DrGRPO", "LossOutput", "Normalizer", "Objective"]
