"""Callbacks: what is logged about selection and training health, the console, and the collapse
guard.

Each is usable alone from a config's ``trainer.callbacks`` list; they read the step's typed record
(:class:`~capo_lightning.training.result.StepResult`, via ``step_result(outputs)``) and the logged
metrics, and (except the collapse detector's ``rollback``) never change training.
"""

from capo_lightning.callbacks.baseline import ValidateBeforeTraining
from capo_lightning.callbacks.checkpoint import InterruptCheckpoint
from capo_lightning.callbacks.collapse import CollapseDetector
from capo_lightning.callbacks.completions import CompletionsLog
from capo_lightning.callbacks.curvature import CurvatureMonitor
from capo_lightning.callbacks.durable_log import DurableLog
from capo_lightning.callbacks.progress import CapoProgressBar
from capo_lightning.callbacks.rejection import RejectionMonitor
from capo_lightning.callbacks.summary import RunSummary
from capo_lightning.callbacks.verified_checkpoint import VerifiedCheckpoint

__all__ = [
    "CapoProgressBar",
    "CollapseDetector",
    "CompletionsLog",
    "CurvatureMonitor",
    "DurableLog",
    "InterruptCheckpoint",
    "RejectionMonitor",
    "RunSummary",
    "ValidateBeforeTraining",
    "VerifiedCheckpoint",
]
