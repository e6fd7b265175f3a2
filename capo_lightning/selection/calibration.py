"""CAPO thresholds measured on the run itself: a monitor-only warm-up, then fixed thresholds at a
percentile.

**Why.** The paper's thresholds (delta_F 1e-4, tau_H 0.01) were set for one model (Qwen2.5-Math-7B,
bf16) at one step size (lr 1.5e-5). A token's shifts depend on both: on SmolLM2-135M at lr 6e-5 the
same numbers reject every token sampled with probability under 0.1 (docs/results.md). Calibration
measures the shifts of the run's own model and optimizer and places the thresholds where the paper's
sit relative to its shifts: in the upper tail, so that only outsized tokens are rejected at the
schedule's peak.

**The scaling law** (exact for m_F, first order for m_H). For one token, with its direction D per
unit lr fixed, u = D h and s = e_a - pi do not depend on the learning rate, so
(:mod:`~capo_lightning.selection.curvature`)

    m_F(lr) = 1/2 lr^2 c,            c = (s . u)^2
    m_H(lr) = lr a + 1/2 lr^2 b,     a = <G, D>,   b = A [(s . u)^2 - u^T F u]

Each warm-up token is stored as (a, b, c), with no learning rate in them, and the thresholds are the
percentile ``q`` of m_F(lr_ref) and |m_H(lr_ref)| over the stored tokens, evaluated at one reference
rate ``lr_ref``. So the warm-up's changing learning rate (it usually overlaps the lr warm-up) does
not enter, and

    delta_F(lr_ref) = lr_ref^2 * P_q(c / 2)           (exactly: a percentile commutes with scaling)
    tau_H(lr_ref)   = P_q(|lr_ref a + 1/2 lr_ref^2 b|)
                    ~ lr_ref * P_q(|a|)               when |lr_ref b| << 2 |a|

so doubling the reference rate multiplies delta_F by 4 and tau_H by about 2 (exactly 2 as the
second-order term vanishes; ``tests/unit/test_calibration.py`` checks both against a direct
computation).

**What is fixed after the warm-up.** The thresholds, as absolute numbers, as the paper's are: a step
of the cosine decay then rejects fewer tokens than the peak (its shifts are smaller), and a step
whose shifts grow (an update turning unstable) rejects more. With ``lr_ref`` = the schedule's peak
(the default), the peak steps reject about the tail the percentile names (for each test; their union
up to twice that) as long as the shift distribution stays as it was in the warm-up.

**The traps, and what is done about each.**

* The shadow Adam of a measuring selector does not advance, so its directions are raw gradients, not
  the Adam steps the enforced phase judges: during the warm-up the shadow Adam advances with every
  token (as an enforcing selector that kept them all), and the first step, whose direction is the
  raw gradient because the shadow state is still empty, is not recorded (it is recorded for the SGD
  shadow model, whose direction is always the gradient).
* Zero-advantage tokens carry no gradient; their Adam direction is the shadow momentum alone,
  another population:
  only tokens with a non-zero advantage are recorded. A warm-up that recorded none goes on until one
  step does.
* The warm-up steps are not protected (nothing is masked in them). Keep ``calibration_steps`` within
  the lr warm-up, where the steps are smallest.
* The learning rate changes every step: handled exactly by the (a, b, c) form above.
* Several ranks: every rank's tokens are gathered before the percentile, so every rank sets the same
  thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from capo_lightning.selection.curvature import Shifts


def lr_free_parts(shifts: Shifts, advantages: Tensor) -> Tensor:
    """[3, T] (a, b, c) of each token (module docstring): m_F(lr) = lr^2 c / 2, m_H(lr) = lr a +
    lr^2 b / 2."""
    c = shifts.s_dot_u.double() ** 2
    b = advantages.double() * (c - shifts.fisher_form.double())
    return torch.stack([shifts.first_order.double(), b, c])


def shifts_at(parts: Tensor, lr: float) -> tuple[Tensor, Tensor]:
    """(m_F, m_H) [T] of tokens stored as ``parts`` [3, T] (:func:`lr_free_parts`) at learning rate
    ``lr``."""
    a, b, c = parts
    return 0.5 * lr**2 * c, lr * a + 0.5 * lr**2 * b


def percentile(values: Tensor, q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) of 1-D ``values`` as an order statistic: the k-th
    smallest value with k = ceil(q / 100 * n) (numpy's ``method="inverted_cdf"``), so the threshold
    is a shift some token had."""
    if values.numel() == 0:
        raise ValueError("percentile of no values")
    k = max(1, math.ceil(q / 100.0 * values.numel()))
    return float(values.double().sort().values[k - 1])


def thresholds(parts: Tensor, lr_ref: float, q: float) -> tuple[float, float]:
    """(delta_F, tau_H) = the percentile ``q`` of m_F and of |m_H| over ``parts`` [3, T] evaluated
    at ``lr_ref``."""
    m_f, m_h = shifts_at(parts, lr_ref)
    return percentile(m_f, q), percentile(m_h.abs(), q)


def gather_by_sum(values: Tensor, all_reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    """``values`` [3, T_r] of every rank, concatenated in rank order along the last dimension, on
    every rank, with nothing but a sum over ranks (the selector's ``all_reduce``): each rank writes
    its block into zeros at its offset and the sum assembles them exactly (adding zeros rounds
    nothing). One process: ``values``."""
    if all_reduce is None:
        return values
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sizes = torch.zeros(world, dtype=torch.long, device=values.device)
    sizes[rank] = values.shape[-1]
    sizes = all_reduce(sizes)
    start = int(sizes[:rank].sum())
    out = torch.zeros(values.shape[0], int(sizes.sum()), dtype=values.dtype, device=values.device)
    out[:, start : start + values.shape[-1]] = values
    return all_reduce(out)
