"""Per-token values of a step's judged micro-batches placed back into [N, L], and shift statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning.selection.capo_step import JudgedPart
from capo_lightning.selection.curvature import BatchShifts, Shifts


class StepRows:
    """Places the per-token values of judged parts (each a set of step rows) back into [N, L] step tensors."""

    def __init__(self, parts: list[JudgedPart]) -> None:
        self.parts = parts
        self.sizes = [int(p.keep.numel()) for p in parts]  # judged tokens per part
        device = parts[0].valid.device
        self.valid = self.scatter(torch.ones(sum(self.sizes), dtype=torch.bool, device=device), fill=False)

    def scatter(self, flat: Tensor, fill: bool | float = 0) -> Tensor:
        """[T] values in the parts' token order -> [N, L] (positions no part judged hold ``fill``)."""
        first = self.parts[0].valid
        out = torch.full((sum(p.valid.shape[0] for p in self.parts), first.shape[1]), fill,
                         device=first.device, dtype=flat.dtype)  # fmt: skip
        start = 0
        for part, size in zip(self.parts, self.sizes, strict=True):
            valid = part.valid
            block = torch.full(valid.shape, fill, device=valid.device, dtype=flat.dtype)
            block[valid] = flat[start : start + size]
            out[part.rows.to(valid.device)] = block
            start += size
        return out


def shift_stats(prefix: str, values: Tensor) -> dict[str, Tensor]:
    """``{prefix}_mean``, ``_max``, ``_p50``, ``_p95`` of 1-D ``values`` (fp64; quantiles interpolate linearly,
    as ``torch.quantile``, without its 2^24-element limit); empty ``values`` give an empty dict."""
    if values.numel() == 0:
        return {}
    ordered = values.double().sort().values
    out = {f"{prefix}_mean": ordered.mean(), f"{prefix}_max": ordered[-1]}
    for name, q in (("p50", 0.5), ("p95", 0.95)):
        position = q * (ordered.numel() - 1)
        low = int(position)
        high = min(low + 1, ordered.numel() - 1)
        out[f"{prefix}_{name}"] = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return out


def step_metrics(
    shifts: Shifts, ok_f: Tensor, ok_h: Tensor, keep: Tensor, pre: BatchShifts, post: BatchShifts
) -> dict[str, Tensor]:
    """One rank's rejection rates and shift statistics of a CAPO step (this rank's tokens only)."""
    n = max(1, ok_f.numel())
    out = {
        "select/token_reject_rate": (~(ok_f & ok_h)).sum().float() / n,
        "select/reject_rate_fisher": (~ok_f).sum().float() / n,
        "select/reject_rate_hessian": (~ok_h).sum().float() / n,
        "curvature/global_fisher": pre.fisher,
        "curvature/global_hessian": pre.hessian,
        "curvature/masked_global_fisher": post.fisher,
        "curvature/masked_global_hessian": post.hessian,
    }
    for name, values in (("fisher", shifts.fisher), ("hessian", shifts.hessian)):
        out.update(shift_stats(f"curvature/token_{name}", values))
        out.update(shift_stats(f"curvature/masked_token_{name}", values[keep]))
    return out
