"""What one rollout batch's step uses, gathered by the module at the start of the step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from capo_lightning.faults import inject
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
    manual_backward: Callable[[Tensor], None]  # the module's
    optimizer: Any  # Lightning-wrapped optimizer
    scheduler: Any | None  # stepped once per optimizer step
    sum_over_ranks: Callable[[Tensor], Tensor] | None  # None in one process
    world_size: int
    max_grad_norm: float | None
    tis_cap: float | None
    rollout_step: int  # for messages
    # a backward inside it keeps its gradient on this rank (scale.parallel.no_sync_for)
    no_sync: Callable[[], AbstractContextManager[Any]] = nullcontext

    def backward(self, loss: Tensor, last: bool = True) -> None:
        """Backpropagate ``loss``, reducing the gradient over ranks only if this is the ``last``
        backward before the optimizer step: the others run under ``no_sync`` and accumulate on this
        rank, so a step of k micro-batches makes one reduction, not k (DDP's all-reduce; FSDP2's
        reduce-scatter when the strategy accumulates unsharded)."""
        inject("backward")
        with nullcontext() if last else self.no_sync():
            self.manual_backward(loss)

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
