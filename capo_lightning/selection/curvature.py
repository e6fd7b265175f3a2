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
[T, V, d] is built: the subspaces come from :mod:`~capo_lightning.selection.subspace`, and [chunk, k, d]
blocks, sized for the device (:func:`block_rows`), are the largest temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from capo_lightning.selection.subspace import TopK, block_rows, token_chunk, topk_policy, with_action

__all__ = [  # the subspace names are re-exported: the curvature model is read as one module
    "BatchShifts", "Direction", "Shifts", "TopK", "adam_direction", "batch_shifts", "block_rows", "row_gradient_sums",
    "seq_then_batch_mean", "shifts_from_direction", "subspace_rows", "token_chunk", "token_gradients", "token_shifts",
    "topk_policy", "with_action",
]  # fmt: skip

Direction = Callable[[Tensor, Tensor], Tensor]
"""The optimizer model: (gradients [..., d] of some vocabulary rows, their row ids [...]) -> the step
direction of those rows per unit lr, same shape (SGD: the gradient itself; Adam: the shadow-Adam step)."""


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
    chunk = block_rows(top.ids.shape[1], hidden.shape[1], hidden.device)
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
    rows: Tensor  # [U] vocabulary rows that some token's subspace contains (on any rank), ascending
    row_gradients: Tensor  # [U, d] mean gradient of the kept tokens per row of ``rows`` (0 where untouched)
    touched: Tensor  # [U] bool, rows that some kept token's subspace contains


def batch_shifts(
    top: TopK,
    hidden: Tensor,
    advantages: Tensor,
    sequence: Tensor,
    keeps: list[Tensor],
    lr: float,
    num_vocab: int,
    direction: Direction,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> list[BatchShifts]:
    """m_F and m_H of the step whose gradient is the kept tokens' per-row mean gradient, for each mask in ``keeps``.

    The row sums and counts are summed over ranks (``all_reduce``) so every rank builds the same
    direction D (one per touched row). Then, per kept token, u = D[ids] h and the same quadratic
    terms as :func:`shifts_from_direction`; m_F = 1/2 lr^2 mean (s . u)^2 and
    m_H = lr <g, D> + 1/2 lr^2 mean A [(s . u)^2 - u^T (diag pi - pi pi^T) u], each mean taken
    within a sequence first, then over sequences (:func:`seq_then_batch_mean`, the code's order).
    Only the U rows some subspace contains are ever formed ([U, d], not [V, d]; U <= T k), and the token
    gradients are formed once for all masks (one pass over [chunk, k, d] blocks).

    Args:
        top: [T, k] top-k policies of this rank's valid tokens.
        hidden: [T, d] their LM-head inputs.
        advantages: [T] their advantages.
        sequence: [T] the sequence (row) each token belongs to.
        keeps: [T] bool masks, each a set of tokens that enter a step (e.g. all tokens, the kept ones).
        lr: the learning rate of the coming step.
        num_vocab: V.
        direction: the optimizer model.
        all_reduce: sums a tensor over ranks; None in one process.
    """
    rows, local = subspace_rows(top.ids, num_vocab, all_reduce)  # [U], [T, k] positions in rows
    f32 = dict(device=hidden.device, dtype=torch.float32)
    sums = [torch.zeros(rows.numel(), hidden.shape[1], **f32) for _ in keeps]
    counts = [torch.zeros(rows.numel(), **f32) for _ in keeps]
    chunk = block_rows(top.ids.shape[1], hidden.shape[1], hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        sub = TopK(local[s : s + chunk], top.probs[s : s + chunk], top.onehot[s : s + chunk])
        grads = token_gradients(sub, hidden[s : s + chunk], advantages[s : s + chunk])
        for keep, row_sums, row_counts in zip(keeps, sums, counts, strict=True):
            row_gradient_sums(sub, grads, keep[s : s + chunk], rows.numel(), row_sums, row_counts)  # accumulates
    local_top = TopK(local, top.probs, top.onehot)
    return [
        _shifts_of_sums(
            local_top, hidden, advantages, sequence, keep, rows, row_sums, row_counts, lr, direction, all_reduce
        )  # fmt: skip
        for keep, row_sums, row_counts in zip(keeps, sums, counts, strict=True)
    ]


def subspace_rows(
    ids: Tensor, num_vocab: int, all_reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """The vocabulary rows any token's subspace contains ([U], ascending; the union over ranks), and each
    subspace slot's position among them ([T, k])."""
    present = torch.zeros(num_vocab, device=ids.device, dtype=torch.float32)
    present[ids.reshape(-1)] = 1.0
    if all_reduce is not None:
        present = all_reduce(present)
    rows = present.nonzero().squeeze(1)  # [U]
    position = torch.zeros(num_vocab, device=ids.device, dtype=torch.long)
    position[rows] = torch.arange(rows.numel(), device=ids.device)
    return rows, position[ids]


def _shifts_of_sums(
    top: TopK,
    hidden: Tensor,
    advantages: Tensor,
    sequence: Tensor,
    keep: Tensor,
    rows: Tensor,
    sums: Tensor,
    counts: Tensor,
    lr: float,
    direction: Direction,
    all_reduce: Callable[[Tensor], Tensor] | None,
) -> BatchShifts:
    """:func:`batch_shifts` for one mask, from its per-row gradient sums [U, d] and counts [U] (``top.ids`` are
    positions in ``rows``)."""
    if all_reduce is not None:
        sums, counts = all_reduce(sums), all_reduce(counts)
    touched = counts > 0  # [U]
    g_rows = sums / counts.clamp(min=1.0).unsqueeze(1)  # untouched rows: 0 / 1
    d_rows = torch.where(touched.unsqueeze(1), direction(g_rows, rows), 0.0)  # no step on untouched rows
    first = (g_rows * d_rows).sum()
    chunk = block_rows(top.ids.shape[1], hidden.shape[1], hidden.device)
    u = torch.cat([  # [T, k]: the step direction on each token's subspace rows, in token chunks
        torch.einsum("tkd,td->tk", d_rows[top.ids[s : s + chunk]], hidden[s : s + chunk])
        for s in range(0, hidden.shape[0], chunk)
    ]) if hidden.shape[0] else torch.zeros(0, top.ids.shape[1], device=hidden.device, dtype=torch.float32)  # fmt: skip
    su, fisher_form = _quadratic_terms(top, u)
    su2 = su**2
    fisher = 0.5 * lr**2 * seq_then_batch_mean(su2, sequence, keep)
    hessian = lr * first + 0.5 * lr**2 * seq_then_batch_mean(advantages * (su2 - fisher_form), sequence, keep)
    return BatchShifts(fisher=fisher, hessian=hessian, rows=rows, row_gradients=g_rows, touched=touched)


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
    """Sum of kept tokens' gradient rows per vocabulary row, and how many kept tokens touched each row.

    The batch ("global") gradient of the code is sums / counts per row (rows never touched stay 0).
    Pass ``sums`` [V, d] and ``counts`` [V] to accumulate into them (chunked callers), else they are new.
    Rejected tokens are added as zeros (not indexed out), so nothing syncs with the host.

    Returns:
        sums [V, d] and counts [V].
    """
    d = grads.shape[-1]
    ids = top.ids.reshape(-1)  # [T * k]
    weight = keep.to(grads.dtype)  # [T]
    if sums is None:
        sums = torch.zeros(num_vocab, d, dtype=grads.dtype, device=grads.device)
    if counts is None:
        counts = torch.zeros(num_vocab, dtype=grads.dtype, device=grads.device)
    sums.index_add_(0, ids, torch.where(keep[:, None, None], grads, 0.0).reshape(-1, d))
    counts.index_add_(0, ids, weight[:, None].expand(top.ids.shape).reshape(-1))
    return sums, counts
