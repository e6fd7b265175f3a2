"""CAPO's last-layer curvature model as pure fp32 functions (capo-method.md sections 2.2 to 2.7).

Everything lives in the LM-head subspace of each token: its top-k vocabulary rows. For token t with
hidden state h_t (the LM-head input), sampled token a_t and advantage A_t:

    pi_t  = softmax of the top-k logits W[ids_t] h_t            [k]   (k = V gives the exact model)
    s_t   = e_{a_t} - pi_t                                      [k]   (the code's ``v``)
    G_t   = A_t s_t h_t^T                                        [k, d] last-layer gradient of A log pi(a)
    D_t   = optimizer-model direction per unit lr                [k, d] (SGD: G_t; Adam: shadow-Adam step)
    u_t   = D_t h_t                                              [k]   predicted logit change per unit lr
    m_F   = 1/2 lr^2 (s_t . u_t)^2                                     policy shift (sampled Fisher form)
    m_H   = lr <G_t, D_t> + 1/2 lr^2 A_t [(s_t . u_t)^2 - u_t^T (diag pi - pi pi^T) u_t]   objective shift

The batch ("global") shifts of :func:`batch_shifts` use the same formulas with one direction for
the whole step, built from the kept tokens' per-row mean gradient. Nothing of shape [N, L, V] or
[T, V, d] is built: logits come from token chunks of h @ W^T, and [chunk, k, d] blocks are the
largest temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

LOGIT_BUDGET = 2**25  # elements of one [chunk, V] logits block (128 MiB in fp32)
BLOCK_BUDGET = 2**21  # elements of one [chunk, k, d] gradient/direction block (8 MiB in fp32): small blocks
# are reused from the allocator's cache, large ones cost fresh zeroed pages on every call (measured on CPU,
# benchmarks/capo_overhead.py --block-budget); read at call time by block_rows

Direction = Callable[[Tensor, Tensor], Tensor]
"""The optimizer model: (gradients [..., d] of some vocabulary rows, their row ids [...]) -> the step
direction of those rows per unit lr, same shape (SGD: the gradient itself; Adam: the shadow-Adam step)."""


@dataclass
class TopK:
    """The top-k renormalised policy of each token."""

    ids: Tensor  # [T, k] long, vocabulary rows
    probs: Tensor  # [T, k] fp32, softmax over the k logits
    onehot: Tensor  # [T, k] fp32, e_a inside the top-k set

    def rows(self, start: int, stop: int) -> TopK:
        """Tokens ``start:stop``."""
        return TopK(self.ids[start:stop], self.probs[start:stop], self.onehot[start:stop])


def block_rows(k: int, d: int) -> int:
    """Tokens per chunk so one [chunk, k, d] block stays within :data:`BLOCK_BUDGET` elements."""
    return max(1, BLOCK_BUDGET // max(1, k * d))


def token_chunk(num_vocab: int, budget: int = LOGIT_BUDGET) -> int:
    """Tokens per chunk so one [chunk, V] logits block stays within ``budget`` elements."""
    return max(1, budget // max(1, num_vocab))


def topk_policy(hidden: Tensor, lm_head: Tensor, actions: Tensor, k: int, chunk: int | None = None) -> TopK:
    """Top-k renormalised softmax of h W^T per token, computed in token chunks.

    If a sampled token is not among the top k (possible with top_p/temperature > 1 sampling), it
    replaces the k-th entry so e_a is always defined; with the paper's top-50 sampling it never is.

    Args:
        hidden: [T, d] LM-head inputs.
        lm_head: [V, d] LM-head weight.
        actions: [T] sampled token ids.
        k: size of the subspace; k >= V means the full vocabulary (exact).
        chunk: tokens per logits block; None sizes it from V.
    """
    num_vocab = lm_head.shape[0]
    k = min(k, num_vocab)
    chunk = chunk or token_chunk(num_vocab)
    weight = lm_head.float()
    ids_parts, val_parts = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start : start + chunk].float() @ weight.T  # [c, V]
        vals, ids = logits.topk(k, dim=-1)  # [c, k]
        act = actions[start : start + chunk]
        missing = ~(ids == act.unsqueeze(1)).any(dim=1)  # [c]
        ids[missing, -1] = act[missing]
        vals[missing, -1] = logits[missing].gather(1, act[missing].unsqueeze(1)).squeeze(1)
        ids_parts.append(ids)
        val_parts.append(vals)
    if not ids_parts:  # no tokens (e.g. every completion masked): empty [0, k] policy
        empty = torch.zeros(0, k, device=hidden.device, dtype=torch.float32)
        return TopK(ids=empty.long(), probs=empty, onehot=empty.clone())
    ids = torch.cat(ids_parts)  # [T, k]
    probs = torch.softmax(torch.cat(val_parts), dim=-1)  # [T, k]
    onehot = (ids == actions.unsqueeze(1)).float()  # [T, k]
    return TopK(ids=ids, probs=probs, onehot=onehot)


def token_gradients(top: TopK, hidden: Tensor, advantages: Tensor) -> Tensor:
    """G_t = A_t (e_a - pi_t) h_t^T restricted to the token's top-k rows -> [T, k, d]."""
    s = top.onehot - top.probs  # [T, k]
    return (advantages.float().unsqueeze(1) * s).unsqueeze(2) * hidden.float().unsqueeze(1)


@dataclass
class Shifts:
    """Per-token shifts and their parts."""

    fisher: Tensor  # [T] m_F
    hessian: Tensor  # [T] m_H
    s_dot_u: Tensor  # [T] (s . u), per unit lr
    fisher_form: Tensor  # [T] u^T (diag pi - pi pi^T) u, per unit lr^2
    first_order: Tensor  # [T] <G, D>


def shifts_from_direction(
    top: TopK, hidden: Tensor, advantages: Tensor, grads: Tensor, direction: Tensor, lr: float
) -> Shifts:
    """m_F and m_H of each token for per-token directions ``direction`` [T, k, d] (per unit lr)."""
    u = torch.einsum("tkd,td->tk", direction, hidden.float())  # [T, k]
    su, fisher_form = _quadratic_terms(top, u)
    first = (grads * direction).sum(dim=(1, 2))  # [T]
    m_f = 0.5 * lr**2 * su**2
    m_h = lr * first + 0.5 * lr**2 * advantages.float() * (su**2 - fisher_form)
    return Shifts(fisher=m_f, hessian=m_h, s_dot_u=su, fisher_form=fisher_form, first_order=first)


def _quadratic_terms(top: TopK, u: Tensor) -> tuple[Tensor, Tensor]:
    """(s . u) and u^T (diag pi - pi pi^T) u per token, for predicted logit changes ``u`` [T, k]."""
    su = ((top.onehot - top.probs) * u).sum(-1)  # [T]
    centred = u - (top.probs * u).sum(-1, keepdim=True)  # [T, k]; u^T (diag pi - pi pi^T) u = E_pi[(u - E_pi u)^2]
    return su, (top.probs * centred * centred).sum(-1)  # [T], stable when u has a large common offset


def token_shifts(top: TopK, hidden: Tensor, advantages: Tensor, lr: float, direction: Direction) -> Shifts:
    """m_F and m_H of every token for its own update (each token's gradient taken as the batch's).

    Computed in token chunks so [chunk, k, d] (see :func:`block_rows`) is the largest block.

    Args:
        top: the tokens' top-k policies (:func:`topk_policy`), [T, k].
        hidden: [T, d] LM-head inputs.
        advantages: [T] advantages.
        lr: the learning rate of the coming step.
        direction: the optimizer model.
    """
    parts = []
    chunk = block_rows(top.ids.shape[1], hidden.shape[1])
    for s in range(0, hidden.shape[0], chunk):
        sub, h, a = top.rows(s, s + chunk), hidden[s : s + chunk], advantages[s : s + chunk]
        grads = token_gradients(sub, h, a)  # [c, k, d]
        step = direction(grads, sub.ids)  # [c, k, d]; a variable on purpose: it is freed when the next block's
        # replaces it, an order in which glibc reuses the pages (inline, the step cost ~20% more page faults)
        parts.append(shifts_from_direction(sub, h, a, grads, step, lr))
    if not parts:
        empty = torch.zeros(0, device=hidden.device, dtype=torch.float32)
        return Shifts(empty, empty, empty, empty, empty)
    return Shifts(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Shifts)))


@dataclass
class BatchShifts:
    """The shifts of one step built from the kept tokens' per-row mean gradient (the code's "global" shifts)."""

    fisher: Tensor  # scalar m_F of the step
    hessian: Tensor  # scalar m_H of the step
    row_gradients: Tensor  # [V, d] mean gradient of the kept tokens per vocabulary row (0 where untouched)
    touched: Tensor  # [V] bool, rows that some kept token's subspace contains


def batch_shifts(
    top: TopK,
    hidden: Tensor,
    advantages: Tensor,
    sequence: Tensor,
    keep: Tensor,
    lr: float,
    num_vocab: int,
    direction: Direction,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> BatchShifts:
    """m_F and m_H of the step whose gradient is the kept tokens' per-row mean gradient.

    The row sums and counts are summed over ranks (``all_reduce``) so every rank builds the same
    direction D (one per touched row). Then, per kept token, u = D[ids] h and the same quadratic
    terms as :func:`shifts_from_direction`; m_F = 1/2 lr^2 mean (s . u)^2 and
    m_H = lr <g, D> + 1/2 lr^2 mean A [(s . u)^2 - u^T (diag pi - pi pi^T) u], each mean taken
    within a sequence first, then over sequences (:func:`seq_then_batch_mean`, the code's order).

    Args:
        top: [T, k] top-k policies of this rank's valid tokens.
        hidden: [T, d] their LM-head inputs.
        advantages: [T] their advantages.
        sequence: [T] the sequence (row) each token belongs to.
        keep: [T] bool, the tokens that enter the step.
        lr: the learning rate of the coming step.
        num_vocab: V.
        direction: the optimizer model.
        all_reduce: sums a tensor over ranks; None in one process.
    """
    sums = torch.zeros(num_vocab, hidden.shape[1], device=hidden.device, dtype=torch.float32)
    counts = torch.zeros(num_vocab, device=hidden.device, dtype=torch.float32)
    chunk = block_rows(top.ids.shape[1], hidden.shape[1])
    for s in range(0, hidden.shape[0], chunk):
        sub = top.rows(s, s + chunk)
        grads = token_gradients(sub, hidden[s : s + chunk], advantages[s : s + chunk])
        row_gradient_sums(sub, grads, keep[s : s + chunk], num_vocab, sums, counts)  # accumulates
    if all_reduce is not None:
        sums, counts = all_reduce(sums), all_reduce(counts)
    touched = counts > 0  # [V]
    g_rows = torch.zeros_like(sums)
    g_rows[touched] = sums[touched] / counts[touched].unsqueeze(1)
    d_rows = torch.zeros_like(sums)
    d_rows[touched] = direction(g_rows[touched], touched.nonzero().squeeze(1))
    first = (g_rows * d_rows).sum()
    u = torch.cat([  # [T, k]: the step direction on each token's subspace rows, in token chunks
        torch.einsum("tkd,td->tk", d_rows[top.ids[s : s + chunk]], hidden[s : s + chunk])
        for s in range(0, hidden.shape[0], chunk)
    ]) if hidden.shape[0] else torch.zeros(0, top.ids.shape[1], device=hidden.device, dtype=torch.float32)  # fmt: skip
    su, fisher_form = _quadratic_terms(top, u)
    su2 = su**2
    fisher = 0.5 * lr**2 * seq_then_batch_mean(su2, sequence, keep)
    hessian = lr * first + 0.5 * lr**2 * seq_then_batch_mean(advantages * (su2 - fisher_form), sequence, keep)
    return BatchShifts(fisher=fisher, hessian=hessian, row_gradients=g_rows, touched=touched)


def seq_then_batch_mean(values: Tensor, sequence: Tensor, keep: Tensor) -> Tensor:
    """Mean over kept tokens within each sequence, then over sequences that have any (the code's order)."""
    if not bool(keep.any()):
        return torch.zeros((), device=values.device, dtype=torch.float32)
    ids, inverse = torch.unique(sequence[keep], return_inverse=True)
    sums = torch.zeros(ids.numel(), device=values.device, dtype=torch.float32).index_add_(0, inverse, values[keep])
    counts = torch.zeros(ids.numel(), device=values.device, dtype=torch.float32).index_add_(
        0, inverse, torch.ones_like(values[keep])
    )
    return (sums / counts).mean()


def adam_direction(grads: Tensor, m: Tensor, v: Tensor, step: int, betas: tuple[float, float], eps: float) -> Tensor:
    """The shadow-Adam step per unit lr if ``grads`` were the batch gradient, without changing state.

    m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,  D = (m' / (1 - b1^(t+1))) / (sqrt(v' / (1 - b2^(t+1))) + eps).
    While the state is empty (``step`` = 0) the direction is the raw gradient, as in the official code.

    Args:
        grads: [..., d] gradients of some vocabulary rows.
        m: first moments of the same rows, broadcastable to ``grads``.
        v: second moments of the same rows.
        step: optimizer steps the shadow state has taken.
        betas: (b1, b2).
        eps: Adam's epsilon.
    """
    if step == 0:
        return grads
    b1, b2 = betas
    m_new = b1 * m + (1 - b1) * grads
    v_new = b2 * v + (1 - b2) * grads * grads
    m_hat = m_new / (1 - b1 ** (step + 1))
    v_hat = v_new / (1 - b2 ** (step + 1))
    return m_hat / (v_hat.sqrt() + eps)


def row_gradient_sums(
    top: TopK, grads: Tensor, keep: Tensor, num_vocab: int, sums: Tensor | None = None, counts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sum of kept tokens' gradient rows per vocabulary row, and how many tokens touched each row.

    The batch ("global") gradient of the code is sums / counts per row (rows never touched stay 0).
    Pass ``sums`` [V, d] and ``counts`` [V] to accumulate into them (chunked callers), else they are new.

    Returns:
        sums [V, d] and counts [V].
    """
    d = grads.shape[-1]
    ids = top.ids[keep].reshape(-1)  # [T_kept * k]
    if sums is None:
        sums = torch.zeros(num_vocab, d, dtype=grads.dtype, device=grads.device)
    if counts is None:
        counts = torch.zeros(num_vocab, dtype=grads.dtype, device=grads.device)
    sums.index_add_(0, ids, grads[keep].reshape(-1, d))
    counts.index_add_(0, ids, torch.ones_like(ids, dtype=grads.dtype))
    return sums, counts
