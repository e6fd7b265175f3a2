"""Each token's top-k subspace of the LM head, where CAPO's curvature model lives, and its block
sizes.

For token t with LM-head input h_t, the subspace is the k vocabulary rows with the largest logits
W h_t (the sampled token forced in); its policy is the softmax of those k logits. The ids can come
from the scoring forward's own logits (:mod:`capo_lightning.models.lm_head`), so no second h W^T
over the vocabulary is needed; only the k logits per token are recomputed here, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# elements of one [chunk, V] logits block (128 MiB in fp32), when the top-k is not given
LOGIT_BUDGET = 2**25
# elements of one [chunk, k, d] gradient/direction block on CPU (8 MiB in fp32): small blocks are
# reused from the allocator's cache, large ones cost fresh zeroed pages on every call (measured on
# CPU, benchmarks/capo_overhead.py --block-budget); read at call time by block_rows
BLOCK_BUDGET = 2**21
# the same on an accelerator (256 MiB): few, large kernels; the caching allocator reuses the memory,
# and each block launch costs the same whatever its size
DEVICE_BLOCK_BUDGET = 2**26


@dataclass
class TopK:
    """The top-k renormalised policy of each token."""

    ids: Tensor  # [T, k] long, vocabulary rows
    probs: Tensor  # [T, k] fp32, softmax over the k logits
    onehot: Tensor  # [T, k] fp32, e_a inside the top-k set

    def rows(self, start: int, stop: int) -> TopK:
        """Tokens ``start:stop``."""
        return TopK(self.ids[start:stop], self.probs[start:stop], self.onehot[start:stop])


def block_rows(k: int, d: int, device: torch.device | None = None) -> int:
    """Tokens per chunk so one [chunk, k, d] block stays within the budget of ``device`` (CPU if
    None):
    :data:`BLOCK_BUDGET` on CPU, :data:`DEVICE_BLOCK_BUDGET` on an accelerator."""
    budget = BLOCK_BUDGET if device is None or device.type == "cpu" else DEVICE_BLOCK_BUDGET
    return max(1, budget // max(1, k * d))


def token_chunk(num_vocab: int, budget: int = LOGIT_BUDGET) -> int:
    """Tokens per chunk so one [chunk, V] logits block stays within ``budget`` elements."""
    return max(1, budget // max(1, num_vocab))


def topk_policy(
    hidden: Tensor,
    lm_head: Tensor,
    actions: Tensor,
    k: int,
    chunk: int | None = None,
    known_ids: Tensor | None = None,
) -> TopK:
    """Top-k renormalised softmax of h W^T per token.

    The k rows come from ``known_ids`` when the scoring forward already found them in its own logits
    (no second h W^T over the vocabulary; their logits are then recomputed in fp32 from the k rows
    alone), else from fp32 logits computed here in token chunks. If a sampled token is not among the
    top k (possible with top_p/temperature > 1 sampling), it replaces the k-th entry so e_a is
    always defined; with the paper's top-50 sampling it never is. No host synchronisation happens in
    the loops.

    Args:
        hidden: [T, d] LM-head inputs.
        lm_head: [V, d] LM-head weight.
        actions: [T] sampled token ids.
        k: size of the subspace; k >= V means the full vocabulary (exact).
        chunk: tokens per logits block; None sizes it from V.
        known_ids: [T, k] ids of each token's k largest logits (descending), or None.
    """
    num_vocab = lm_head.shape[0]
    k = min(k, num_vocab)
    weight = lm_head.float()
    if hidden.shape[0] == 0:  # no tokens (e.g. every completion masked): empty [0, k] policy
        empty = torch.zeros(0, k, device=hidden.device, dtype=torch.float32)
        return TopK(ids=empty.long(), probs=empty, onehot=empty.clone())
    if known_ids is not None and known_ids.shape[1] == k:
        ids = with_action(known_ids, actions)
        vals = subspace_logits(hidden, weight, ids)
    else:
        ids, vals = _search_topk(hidden, weight, actions, k, chunk or token_chunk(num_vocab))
    probs = torch.softmax(vals, dim=-1)  # [T, k]
    onehot = (ids == actions.unsqueeze(1)).float()  # [T, k]
    return TopK(ids=ids, probs=probs, onehot=onehot)


def with_action(ids: Tensor, actions: Tensor) -> Tensor:
    """[T, k] ids with the sampled token in the last column of the rows that lack it (a new
    tensor)."""
    missing = ~(ids == actions.unsqueeze(1)).any(dim=1)  # [T]
    out = ids.clone()
    out[:, -1] = torch.where(missing, actions, ids[:, -1])
    return out


def subspace_logits(hidden: Tensor, weight: Tensor, ids: Tensor) -> Tensor:
    """[T, k] fp32 logits W[ids_t] h_t of each token's own rows, in [chunk, k, d] blocks."""
    chunk = block_rows(ids.shape[1], hidden.shape[1], hidden.device)
    return torch.cat(
        [
            torch.einsum("tkd,td->tk", weight[ids[s : s + chunk]], hidden[s : s + chunk].float())
            for s in range(0, hidden.shape[0], chunk)
        ]
    )


def _search_topk(
    hidden: Tensor, weight: Tensor, actions: Tensor, k: int, chunk: int
) -> tuple[Tensor, Tensor]:
    """(ids, logits) [T, k] of each token's k largest fp32 logits (the action forced in), over
    [chunk, V] blocks."""
    ids_parts, val_parts = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start : start + chunk].float() @ weight.T  # [c, V]
        vals, ids = logits.topk(k, dim=-1)  # [c, k]
        act = actions[start : start + chunk]
        missing = ~(ids == act.unsqueeze(1)).any(dim=1)  # [c]
        ids[:, -1] = torch.where(missing, act, ids[:, -1])
        vals[:, -1] = torch.where(
            missing, logits.gather(1, act.unsqueeze(1)).squeeze(1), vals[:, -1]
        )
        ids_parts.append(ids)
        val_parts.append(vals)
    return torch.cat(ids_parts), torch.cat(val_parts)
