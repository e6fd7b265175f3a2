"""CAPO's last-layer curvature model as pure fp32 functions (capo-method.md sections 2.2 to 2.7).

Everything lives in the LM-head subspace of each token: its top-k vocabulary rows. For token t with
hidden state h_t (the LM-head input), sampled token a_t and advantage A_t:

    pi_t  = softmax of the top-k logits W[ids_t] h_t [k]     (k = V gives the exact model)
    s_t   = e_{a_t} - pi_t                           [k]     (the code's ``v``)
    G_t   = A_t s_t h_t^T                            [k, d]  last-layer gradient of A log pi(a)
    D_t   = optimizer-model direction per unit lr    [k, d]  (SGD: G_t; Adam: shadow-Adam step)
    u_t   = D_t h_t                                  [k]     predicted logit change per unit lr
    m_F   = 1/2 lr^2 (s_t . u_t)^2                           policy shift (sampled Fisher form)
    m_H   = lr <G_t, D_t> + 1/2 lr^2 A_t [(s_t . u_t)^2 - u_t^T (diag pi - pi pi^T) u_t]
                                                             objective shift

The batch ("global") shifts (:mod:`~capo_lightning.selection.global_shifts`) use the same formulas
with one direction for the whole step, built from the kept tokens' per-row mean gradient. Nothing
of shape [N, L, V] or [T, V, d] is built: the subspaces come from
:mod:`~capo_lightning.selection.subspace`, and [chunk, k, d] blocks, sized for the device
(:func:`block_rows`), are the largest temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from capo_lightning.selection.subspace import (
    TopK,
    block_rows,
    token_chunk,
    topk_policy,
    with_action,
)

__all__ = [  # the subspace names are re-exported: the per-token model is read as one module
    "Direction",
    "Shifts",
    "TopK",
    "adam_direction",
    "block_rows",
    "quadratic_terms",
    "shifts_from_direction",
    "token_chunk",
    "token_gradients",
    "token_shifts",
    "topk_policy",
    "with_action",
]

Direction = Callable[[Tensor, Tensor], Tensor]
"""The optimizer model: (gradients [..., d] of some vocabulary rows, their row ids [...]) -> the
step direction of those rows per unit lr, same shape (SGD: the gradient itself; Adam: the
shadow-Adam step)."""


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
    su, fisher_form = quadratic_terms(top, u)
    first = (grads * direction).sum(dim=(1, 2))  # [T]
    m_f = 0.5 * lr**2 * su**2
    m_h = lr * first + 0.5 * lr**2 * advantages.float() * (su**2 - fisher_form)
    return Shifts(fisher=m_f, hessian=m_h, s_dot_u=su, fisher_form=fisher_form, first_order=first)


def quadratic_terms(top: TopK, u: Tensor) -> tuple[Tensor, Tensor]:
    """(s . u) and u^T (diag pi - pi pi^T) u per token, for predicted logit changes ``u`` [T, k]."""
    su = ((top.onehot - top.probs) * u).sum(-1)  # [T]
    # [T, k]; u^T (diag pi - pi pi^T) u = E_pi[(u - E_pi u)^2]
    centred = u - (top.probs * u).sum(-1, keepdim=True)
    # [T], stable when u has a large common offset
    return su, (top.probs * centred * centred).sum(-1)


def token_shifts(
    top: TopK, hidden: Tensor, advantages: Tensor, lr: float, direction: Direction
) -> Shifts:
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
        # [c, k, d]; a variable on purpose: it is freed when the next block's replaces it, an order
        # in which glibc reuses the pages (inline, the step cost ~20% more page faults)
        step = direction(grads, sub.ids)
        parts.append(shifts_from_direction(sub, h, a, grads, step, lr))
    if not parts:
        empty = torch.zeros(0, device=hidden.device, dtype=torch.float32)
        return Shifts(empty, empty, empty, empty, empty)
    return Shifts(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Shifts)))


def adam_direction(
    grads: Tensor, m: Tensor, v: Tensor, step: int, betas: tuple[float, float], eps: float
) -> Tensor:
    """The shadow-Adam step per unit lr if ``grads`` were the batch gradient, without changing
    state.

    m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,
    D = (m' / (1 - b1^(t+1))) / (sqrt(v' / (1 - b2^(t+1))) + eps). While the state is empty
    (``step`` = 0) the direction is the raw gradient, as in the official code.

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
