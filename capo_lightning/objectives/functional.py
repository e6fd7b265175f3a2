"""Pure tensor math shared by every objective: advantages, surrogate, KL, aggregation.

No config objects and no module state here, so every function can be checked against
values worked by hand. Shapes follow the legend in :mod:`capo_lightning.batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

CONSTANT_TOL = 1e-6  # rewards of a group within this range count as all equal


@dataclass(frozen=True)
class Normalizer:
    """Global denominators of one optimizer step's loss, computed once from the final mask.

    Counts are summed over every micro-batch of the minibatch and all-reduced over ranks, so the
    gradient does not depend on how the minibatch is split. DDP averages gradients over ranks;
    ``world_size`` multiplies each rank's loss back so the average equals the global value.
    """

    num_sequences: float  # sequences in the minibatch, all ranks
    num_tokens: float  # kept tokens in the minibatch, all ranks
    world_size: int = 1
    max_len: int | None = None  # constant L of Dr.GRPO (max_new_tokens)

    @classmethod
    def from_mask(
        cls,
        mask: Tensor,
        max_len: int | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        world_size: int = 1,
    ) -> Normalizer:
        """Count sequences and kept tokens in ``mask`` [N, L], summed over ranks by
        ``all_reduce``."""
        counts = torch.tensor(
            [float(mask.shape[0]), float(mask.sum())], dtype=torch.float64, device=mask.device
        )
        if all_reduce is not None:
            counts = all_reduce(counts)
        return cls(
            num_sequences=float(counts[0]),
            num_tokens=float(counts[1]),
            world_size=world_size,
            max_len=max_len,
        )

    def denominator(self, aggregation: str) -> float:
        """The denominator ``aggregation`` divides by (logged as ``objective/normalizer``)."""
        return _rule(aggregation).denominator(self)


@dataclass(frozen=True)
class AggregationRule:
    """One way to reduce per-token values to a step loss:
    ``numerator(values, mask) / denominator(norm)``."""

    numerator: Callable[[Tensor, Tensor], Tensor]  # ([n, L] values, [n, L] float mask) -> scalar
    denominator: Callable[[Normalizer], float]  # global counts of the step -> divisor


def _sum_of_sequence_means(values: Tensor, mask_f: Tensor) -> Tensor:
    # sum over rows of [N] means
    return ((values * mask_f).sum(dim=1) / mask_f.sum(dim=1).clamp(min=1.0)).sum()


def _token_sum(values: Tensor, mask_f: Tensor) -> Tensor:
    return (values * mask_f).sum()


def _constant_len_times_sequences(norm: Normalizer) -> float:
    if norm.max_len is None:
        raise ValueError(
            "aggregation 'seq_mean_token_sum_norm' needs Normalizer.max_len (the constant L)"
        )
    return norm.max_len * norm.num_sequences


AGGREGATIONS: dict[str, AggregationRule] = {
    # GRPO (DeepSeekMath): mean over sequences of each sequence's token mean; a sequence with no
    # kept token contributes 0 but still counts in the mean
    "seq_mean_token_mean": AggregationRule(_sum_of_sequence_means, lambda norm: norm.num_sequences),
    # Dr.GRPO: sum of kept token values / (constant L x sequences)
    "seq_mean_token_sum_norm": AggregationRule(_token_sum, _constant_len_times_sequences),
    # DAPO: sum over every kept token / global kept-token count
    "token_mean": AggregationRule(_token_sum, lambda norm: max(norm.num_tokens, 1.0)),
}
"""The aggregation modes, by the name objectives give in ``Objective.aggregation``."""


def _rule(mode: str) -> AggregationRule:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {tuple(AGGREGATIONS)}")
    return AGGREGATIONS[mode]


def group_advantages(
    rewards: Tensor, group_ids: Tensor, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages A_i = (R_i - mean_g R) / (std_g R + eps).

    ``std`` is the Bessel-corrected (unbiased) standard deviation over the group, as in the
    DeepSeekMath GRPO code and the CAPO official code. A group of one sample gets advantage 0
    (there is no baseline to compare with), and a group whose rewards all agree (max - min <=
    ``CONSTANT_TOL``) gets exactly 0, whatever the float rounding of its mean.

    Args:
        rewards: [N] float rewards.
        group_ids: [N] long, which prompt each completion belongs to (any integers).
        scale_by_std: divide by the group std (GRPO); False gives Dr.GRPO's mean-centred advantage.
        eps: added to the std before dividing.

    Returns:
        [N] float advantages.
    """
    rewards = rewards.float()
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [N] dense group index
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.bincount(inverse, minlength=num_groups).float()  # [num_groups]
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, rewards
    )
    means = sums / counts  # [num_groups]
    centred = rewards - means[inverse]  # [N]
    if scale_by_std:
        sq = torch.zeros_like(sums).index_add_(0, inverse, centred**2)  # [num_groups]
        std = (sq / (counts - 1).clamp(min=1)).sqrt()  # [num_groups], unbiased
        centred = centred / (std[inverse] + eps)
    # groups of one, and groups whose rewards agree up to float noise (the fp32 mean of 16 x 0.7 is
    # off by ~6e-8, which the std would blow up), get exactly 0
    hi = torch.full_like(sums, -torch.inf).scatter_reduce(0, inverse, rewards, "amax")
    lo = torch.full_like(sums, torch.inf).scatter_reduce(0, inverse, rewards, "amin")
    no_signal = (counts[inverse] < 2) | ((hi - lo)[inverse] <= CONSTANT_TOL)  # [N]
    return torch.where(no_signal, torch.zeros_like(centred), centred)


class Surrogate(NamedTuple):
    """Per-token result of :func:`clipped_surrogate`; every field is [N, L]."""

    loss: Tensor  # -min(r A, clip(r) A) [dual-clipped], with grad
    ratio: Tensor  # pi_theta / pi_old, detached
    clipped_low: Tensor  # bool: ratio < 1 - clip_low with A < 0 (the clip removed the gradient)
    clipped_high: Tensor  # bool: ratio > 1 + clip_high with A > 0


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> Surrogate:
    """Per-token PPO loss  l = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A).

    With ``dual_clip = c`` (> 1), the loss of tokens with A < 0 is capped at -c A:
    l = min(l, -c A) (Ye et al. 2020, "dual clip"; verl's ``clip_ratio_c``).

    Args:
        logprobs: [N, L] log pi_theta(a_t | s_t), with grad.
        old_logprobs: [N, L] log pi_old(a_t | s_t), detached.
        advantages: [N] or [N, L].
        clip_low: epsilon_low.
        clip_high: epsilon_high (clip-higher when > clip_low).
        dual_clip: c for the dual clip, or None.

    Returns:
        A :class:`Surrogate`: the per-token loss, the ratio and the masks of tokens whose gradient
        the clip removed (ratio below 1 - clip_low with A < 0, above 1 + clip_high with A > 0).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [N, 1]
    ratio = torch.exp(logprobs - old_logprobs)  # [N, L]
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)  # [N, L]
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * advantages)
        loss = torch.where(advantages < 0, capped, loss)
    with torch.no_grad():
        clipped_low = (ratio < 1.0 - clip_low) & (advantages < 0)
        clipped_high = (ratio > 1.0 + clip_high) & (advantages > 0)
    return Surrogate(loss, ratio.detach(), clipped_low, clipped_high)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: exp(q - p) - (q - p) - 1.

    With p = log pi_theta(a) and q = log pi_ref(a), a ~ pi_theta. Non-negative, unbiased.
    The log-ratio is clamped to +-20 so one outlier token cannot overflow.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # [N, L]
    return torch.expm1(log_ratio) - log_ratio


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: Normalizer) -> Tensor:
    """Reduce per-token values [N, L] over kept tokens to this micro-batch's share of the loss.

    Each mode of :data:`AGGREGATIONS` is defined at the optimizer-step level: the micro-batch
    contributions summed over micro-batches (and averaged by DDP over ranks) give exactly the
    full-batch value, because the denominators come from ``norm`` (global counts), never from the
    micro-batch.
    """
    rule = _rule(mode)
    return rule.numerator(values, mask.to(values.dtype)) / rule.denominator(norm) * norm.world_size


def truncated_importance_weight(
    old_logprobs: Tensor, behavior_logprobs: Tensor, cap: float
) -> Tensor:
    """Truncated importance weight min(pi_old / pi_behavior, cap) per token, detached (Yao et al.
    2025, TIS).

    Corrects for the sampling engine's logprobs differing from the trainer's (vLLM kernels, bf16):
    the samples come from pi_behavior while the surrogate is written for pi_old.
    """
    log_ratio = (old_logprobs - behavior_logprobs).clamp(max=20.0)  # [N, L]
    return torch.exp(log_ratio).clamp(max=cap).detach()


def zero_std_group_fraction(
    rewards: Tensor, group_ids: Tensor, tol: float = CONSTANT_TOL
) -> Tensor:
    """Fraction of groups whose rewards all agree (max - min <= tol): their advantages are 0."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    hi = torch.full(
        (num_groups,), -torch.inf, device=rewards.device, dtype=torch.float32
    ).scatter_reduce(0, inverse, rewards.float(), "amax")
    lo = torch.full(
        (num_groups,), torch.inf, device=rewards.device, dtype=torch.float32
    ).scatter_reduce(0, inverse, rewards.float(), "amin")
    return ((hi - lo) <= tol).float().mean() if num_groups else torch.zeros((), dtype=torch.float32)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over True entries of ``mask`` (0 when the mask is empty)."""
    mask_f = mask.to(values.dtype)
    return (values * mask_f).sum() / mask_f.sum().clamp(min=1.0)
