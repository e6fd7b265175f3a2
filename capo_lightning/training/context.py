"""What one rollout batch's step uses, gathered by the module at the start of the step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from capo_lightning.objectives import Objective
from capo_lightning.selection import Selector
from capo_lightning.training.guard import NonFiniteGuard


@dataclass
class StepContext:
    """Everything one rollout batch's step uses, gathered by the module at the start of the step."""

    policy: nn.Module
    objective: Objective
    selector: Selector | None
    guard: NonFiniteGuard
    backward: Callable[[Tensor], None]  # the module's manual_backward
    optimizer: Any  # Lightning-wrapped optimizer
    scheduler: Any | None  # stepped once per optimizer step
    sum_over_ranks: Callable[[Tensor], Tensor] | None  # None in one process
    world_size: int
    max_grad_norm: float | None
    tis_cap: float | None
    rollout_step: int  # for messages

    @property
    def lr(self) -> float:
        """The learning rate the coming optimizer step will use."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def base_lr(self) -> float:
        """The optimizer's configured lr (the peak of a warm-up/decay schedule; the current lr
        without one)."""
        group = self.optimizer.param_groups[0]
        return float(group.get("initial_lr", group["lr"]))
