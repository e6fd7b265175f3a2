"""Per-token values of a step's judged micro-batches placed back into [N, L], and shift
statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning.selection.capo_step import JudgedPart


class StepRows:
    """Places the per-token values of judged parts (each a set of step rows) back into [N, L] step
    tensors."""

    def __init__(self, parts: list[JudgedPart]) -> None:
        self.parts = parts
        self.sizes = [int(p.keep.numel()) for p in parts]  # judged tokens per part
        device = parts[0].valid.device
        self.valid = self.scatter(
            torch.ones(sum(self.sizes), dtype=torch.bool, device=device), fill=False
        )

    def scatter(self, flat: Tensor, fill: bool | float = 0) -> Tensor:
        """[T] values in the parts' token order -> [N, L] (positions no part judged hold
        ``fill``)."""
        first = self.parts[0].valid
        out = torch.full(
            (sum(p.valid.shape[0] for p in self.parts), first.shape[1]),
            fill,
            device=first.device,
            dtype=flat.dtype,
        )
        start = 0
        for part, size in zip(self.parts, self.sizes, strict=True):
            valid = part.valid
            block = torch.full(valid.shape, fill, device=valid.device, dtype=flat.dtype)
            block[valid] = flat[start : start + size]
            out[part.rows.to(valid.device)] = block
            start += size
        return out
