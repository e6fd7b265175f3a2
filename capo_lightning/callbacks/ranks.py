"""Sums and gathers over the ranks of a run, for monitors that must count the whole step, not one
rank."""

from __future__ import annotations

import torch
from lightning import Trainer
from torch import Tensor


def sum_over_ranks(trainer: Trainer, values: Tensor) -> Tensor:
    """``values`` summed element-wise over every rank (itself in one process). Every rank must call
    it."""
    if trainer.world_size == 1:
        return values
    return trainer.strategy.reduce(values.clone(), reduce_op="sum")


def gather_over_ranks(trainer: Trainer, values: Tensor) -> Tensor:
    """The 1-D ``values`` of every rank, concatenated in rank order; ranks may hold different
    lengths.

    Every rank must call it. Lengths are exchanged first, each rank pads to the longest, and the
    padding is cut off again, so nothing invented enters a percentile.
    """
    if trainer.world_size == 1:
        return values
    count = torch.tensor([values.numel()], device=values.device)
    counts = trainer.strategy.all_gather(count).reshape(-1).tolist()  # [W]
    padded = torch.zeros(max(counts), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = trainer.strategy.all_gather(padded).reshape(len(counts), -1)  # [W, max]
    return torch.cat([gathered[rank, :n] for rank, n in enumerate(counts)])
