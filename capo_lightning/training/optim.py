"""Default optimizer and learning-rate schedule, injected into the module as callables."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with the HF Trainer defaults the CAPO runs used (betas 0.9/0.999, eps 1e-8, no weight
    decay) at lr 1e-6. Configure another one with
    ``model.optimizer: {class_path: torch.optim.AdamW, init_args: {lr: ...}}``.
    """
    return torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


class WarmupCosineLR(LambdaLR):
    """Linear warmup to the base lr, then cosine decay to ``min_lr_ratio`` x base lr.

    Stepped once per optimizer step. ``total_steps=None`` is filled in by the module from
    ``trainer.max_steps`` before the first step, so the schedule follows ``--trainer.max_steps``
    overrides without interpolation tricks; a run without ``max_steps`` is refused (it used to
    schedule over one step, so the lr fell to its floor after the first).

    Args:
        optimizer: the optimizer whose lr is scheduled.
        warmup_ratio: fraction of total steps spent warming up (HF ``warmup_ratio``; the paper uses
            0.1).
        warmup_steps: absolute warmup steps; overrides ``warmup_ratio`` when set.
        total_steps: steps of the whole schedule; None = the trainer's max_steps.
        min_lr_ratio: final lr as a fraction of the base lr.

    Departure from HF's ``get_cosine_schedule_with_warmup``: warmup step s uses (s + 1) / (warmup +
    1) instead of s / warmup, so the first optimizer step does not run at lr 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_ratio: float = 0.1,
        warmup_steps: int | None = None,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"WarmupCosineLR warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def set_total_steps(self, total_steps: int | None) -> None:
        """Fix the schedule length (the trainer's ``max_steps``) and re-apply the factor of the
        current step."""
        if total_steps is None or total_steps <= 0:
            raise ValueError(
                f"WarmupCosineLR needs the run's length, but trainer.max_steps is {total_steps}: "
                "set --trainer.max_steps N (optimizer steps), or the schedule's own total_steps "
                "(model.lr_scheduler.init_args.total_steps)"
            )
        self.total_steps = total_steps
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def factor(self, step: int) -> float:
        """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
        total = self.total_steps
        if total is None or total <= 0:
            return 1.0
        warmup = (
            self.warmup_steps
            if self.warmup_steps is not None
            else math.ceil(self.warmup_ratio * total)
        )
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


def optimizer_config(
    params: list[torch.nn.Parameter],
    optimizer_factory: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
    scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None,
    run_steps: Callable[[], int],
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer over ``params``, with its lr schedule
    stepped once per optimizer step when one is configured. A :class:`WarmupCosineLR` without a
    length of its own gets the run's (``run_steps()``, asked only then: ``trainer.max_steps``)."""
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
        scheduler.set_total_steps(run_steps())
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
    }
