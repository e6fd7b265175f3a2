"""The batch ("global") shifts of one step, the official code's second pair of shifts: m_F and m_H
of the update whose gradient is the kept tokens' per-row mean gradient (one direction per
vocabulary row for the whole step), with the per-token formulas of
:mod:`~capo_lightning.selection.curvature`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from capo_lightning.selection.curvature import Direction, quadratic_terms, token_gradients
from capo_lightning.selection.subspace import TopK, block_rows


@dataclass
class BatchShifts:
    """The shifts of one step built from the kept tokens' per-row mean gradient (the code's "global"
    shifts)."""

    fisher: Tensor  # scalar m_F of the step
    hessian: Tensor  # scalar m_H of the step
    rows: Tensor  # [U] vocabulary rows that some token's subspace contains (on any rank), ascending
    # [U, d] mean gradient of the kept tokens per row of ``rows`` (0 where untouched)
    row_gradients: Tensor
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
    """m_F and m_H of the step whose gradient is the kept tokens' per-row mean gradient, for each
    mask in ``keeps``.

    The row sums and counts are summed over ranks (``all_reduce``) so every rank builds the same
    direction D (one per touched row). Then, per kept token, u = D[ids] h and the same quadratic
    terms as :func:`~.curvature.shifts_from_direction`; m_F = 1/2 lr^2 mean (s . u)^2 and
    m_H = lr <g, D> + 1/2 lr^2 mean A [(s . u)^2 - u^T (diag pi - pi pi^T) u], each mean taken
    within a sequence first, then over sequences (:func:`seq_then_batch_mean`, the code's order).
    Only the U rows some subspace contains are ever formed ([U, d], not [V, d]; U <= T k), and the
    token gradients are formed once for all masks (one pass over [chunk, k, d] blocks).

    Args:
        top: [T, k] top-k policies of this rank's valid tokens.
        hidden: [T, d] their LM-head inputs.
        advantages: [T] their advantages.
        sequence: [T] the sequence (row) each token belongs to.
        keeps: [T] bool masks, each a set of tokens that enter a step (e.g. all tokens, the kept
            ones).
        lr: the learning rate of the coming step.
        num_vocab: V.
        direction: the optimizer model.
        all_reduce: sums a tensor over ranks; None in one process.
    """
    rows, local = subspace_rows(top.ids, num_vocab, all_reduce)  # [U], [T, k] positions in rows
    local_top = TopK(local, top.probs, top.onehot)
    sums, counts = _kept_row_sums(local_top, hidden, advantages, keeps, rows.numel())
    return [
        _shifts_of_sums(
            local_top,
            hidden,
            advantages,
            sequence,
            keep,
            rows,
            row_sums,
            row_counts,
            lr,
            direction,
            all_reduce,
        )
        for keep, row_sums, row_counts in zip(keeps, sums, counts, strict=True)
    ]


def _kept_row_sums(
    top: TopK, hidden: Tensor, advantages: Tensor, keeps: list[Tensor], num_rows: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Per mask of ``keeps``, its tokens' gradient sums [U, d] and counts [U] per subspace row
    (``top.ids`` are positions among the U rows), the token gradients formed once for all masks in
    [chunk, k, d] blocks."""
    f32 = dict(device=hidden.device, dtype=torch.float32)
    sums = [torch.zeros(num_rows, hidden.shape[1], **f32) for _ in keeps]
    counts = [torch.zeros(num_rows, **f32) for _ in keeps]
    chunk = block_rows(top.ids.shape[1], hidden.shape[1], hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        sub = TopK(top.ids[s : s + chunk], top.probs[s : s + chunk], top.onehot[s : s + chunk])
        grads = token_gradients(sub, hidden[s : s + chunk], advantages[s : s + chunk])
        for keep, row_sums, row_counts in zip(keeps, sums, counts, strict=True):
            # accumulates
            row_gradient_sums(sub, grads, keep[s : s + chunk], num_rows, row_sums, row_counts)
    return sums, counts


def subspace_rows(
    ids: Tensor, num_vocab: int, all_reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """The vocabulary rows any token's subspace contains ([U], ascending; the union over ranks), and
    each subspace slot's position among them ([T, k])."""
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
    """:func:`batch_shifts` for one mask, from its per-row gradient sums [U, d] and counts [U]
    (``top.ids`` are positions in ``rows``)."""
    if all_reduce is not None:
        sums, counts = all_reduce(sums), all_reduce(counts)
    touched = counts > 0  # [U]
    g_rows = sums / counts.clamp(min=1.0).unsqueeze(1)  # untouched rows: 0 / 1
    # no step on untouched rows
    d_rows = torch.where(touched.unsqueeze(1), direction(g_rows, rows), 0.0)
    first = (g_rows * d_rows).sum()
    su, fisher_form = quadratic_terms(top, _on_subspaces(d_rows, top, hidden))
    su2 = su**2
    fisher = 0.5 * lr**2 * seq_then_batch_mean(su2, sequence, keep)
    hessian = lr * first + 0.5 * lr**2 * seq_then_batch_mean(
        advantages * (su2 - fisher_form), sequence, keep
    )
    return BatchShifts(
        fisher=fisher, hessian=hessian, rows=rows, row_gradients=g_rows, touched=touched
    )


def _on_subspaces(d_rows: Tensor, top: TopK, hidden: Tensor) -> Tensor:
    """u [T, k]: the step direction on each token's subspace rows (D[ids_t] h_t), in chunks."""
    if not hidden.shape[0]:
        return torch.zeros(0, top.ids.shape[1], device=hidden.device, dtype=torch.float32)
    chunk = block_rows(top.ids.shape[1], hidden.shape[1], hidden.device)
    return torch.cat(
        [
            torch.einsum("tkd,td->tk", d_rows[top.ids[s : s + chunk]], hidden[s : s + chunk])
            for s in range(0, hidden.shape[0], chunk)
        ]
    )


def seq_then_batch_mean(values: Tensor, sequence: Tensor, keep: Tensor) -> Tensor:
    """Mean over kept tokens within each sequence, then over sequences that have any (the code's
    order)."""
    if not bool(keep.any()):
        return torch.zeros((), device=values.device, dtype=torch.float32)
    ids, inverse = torch.unique(sequence[keep], return_inverse=True)
    sums = torch.zeros(ids.numel(), device=values.device, dtype=torch.float32).index_add_(
        0, inverse, values[keep]
    )
    counts = torch.zeros(ids.numel(), device=values.device, dtype=torch.float32).index_add_(
        0, inverse, torch.ones_like(values[keep])
    )
    return (sums / counts).mean()


def row_gradient_sums(
    top: TopK,
    grads: Tensor,
    keep: Tensor,
    num_vocab: int,
    sums: Tensor | None = None,
    counts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of kept tokens' gradient rows per vocabulary row, and how many kept tokens touched each
    row.

    The batch ("global") gradient of the code is sums / counts per row (rows never touched stay 0).
    Pass ``sums`` [V, d] and ``counts`` [V] to accumulate into them (chunked callers), else they are
    new. Rejected tokens are added as zeros (not indexed out), so nothing syncs with the host.

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
