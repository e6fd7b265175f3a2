"""Order statistics of shift values, for a Selection's own metrics and the curvature monitor."""

from __future__ import annotations

from torch import Tensor


def shift_stats(prefix: str, values: Tensor) -> dict[str, Tensor]:
    """``{prefix}_mean``, ``_max``, ``_p50``, ``_p95`` of 1-D ``values`` (fp64; quantiles
    interpolate linearly, as ``torch.quantile``, without its 2^24-element limit); empty ``values``
    give an empty dict."""
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
