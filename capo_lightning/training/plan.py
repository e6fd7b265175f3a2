"""How one rollout batch is cut into optimizer steps (minibatches) and forward passes
(micro-batches), and which settings that makes inert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepPlan:
    """``ppo_epochs`` passes over N rows, each split into ``minibatches`` optimizer steps, each
    accumulated over micro-batches of at most ``micro_batch_size`` rows."""

    num_rows: int
    ppo_epochs: int
    minibatches: int
    micro_batch_size: int
    seed: int = 0

    @property
    def single_update(self) -> bool:
        """One optimizer step per batch (mu = 1, one minibatch): each training forward is its own
        old policy."""
        return self.ppo_epochs == 1 and self.minibatches == 1

    def minibatch_rows(self, epoch: int) -> list[Tensor]:
        """Row indices of each minibatch in pass ``epoch``: one fixed shuffle per epoch (the first
        pass keeps order)."""
        if epoch == 0:
            order = torch.arange(self.num_rows)
        else:
            order = torch.randperm(
                self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
        return list(order.chunk(self.minibatches))

    def micro_rows(self, rows: Tensor, lengths: Tensor | None = None) -> list[Tensor]:
        """Split a minibatch's rows into micro-batches; with ``lengths`` [N] (tokens per row), rows
        of similar length go together (longest first), so each micro-batch's forward pads less (the
        sum over micro-batches, hence the gradient, does not depend on the grouping)."""
        if lengths is not None and len(rows) > self.micro_batch_size:
            rows = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
        return list(rows.split(self.micro_batch_size))

    def chunks(self, num_rows: int, lengths: Tensor | None = None) -> list[Tensor]:
        """Micro-batch-sized chunks of all rows (grouped by ``lengths`` when given)."""
        return self.micro_rows(torch.arange(num_rows), lengths)


def plan_step(
    num_rows: int, ppo_epochs: int, minibatches: int, micro_batch_size: int | None
) -> StepPlan:
    """Validate and build the plan; ``minibatches`` must divide N so every step sees equal work."""
    if num_rows % minibatches:
        raise ValueError(
            f"model.minibatches={minibatches} does not divide the {num_rows} completions of a step "
            "(data.prompts_per_step x data.group_size); pick a divisor"
        )
    return StepPlan(num_rows, ppo_epochs, minibatches, micro_batch_size or num_rows)


def inert_settings(
    ppo_epochs: int, minibatches: int, objective: Any, tis_cap: float | None, engine: Any
) -> list[str]:
    """Warnings for settings that cannot act in this run: a clip range with one update per batch
    (the ratio is exactly 1), TIS with an engine that samples with the policy itself."""
    found = []
    if ppo_epochs == 1 and minibatches == 1 and objective.uses_clipping:
        found.append(
            "capo: model.ppo_epochs = model.minibatches = 1, so the ratio is exactly 1 and the "
            f"clip range ({type(objective).__name__} clip_low/clip_high) never acts; "
            "raise either to use it."
        )
    if tis_cap is not None and engine.shares_policy:
        found.append(
            f"capo: model.tis_cap is set but {type(engine).__name__} samples with the "
            "policy itself, so engine and trainer logprobs agree and the importance weight is "
            "~1; it matters with vLLM."
        )
    return found
