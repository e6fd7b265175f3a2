"""Pure tensor math shared by every objective: advantages, surrogate, KL, aggregation.

No config objects and no module state here, so every function can be checked against
values worked by hand. Shapes follow the legend in :mod:`capo_lightning.batch`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from capo_lightning.objectives.base import Normalizer

Aggregation = Literal["seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"]
AGGREGATIONS: tuple[str, ...] = ("seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean")
CONSTANT_TOL = 1e-6  # rewards of a group within this range count as all equal


def group_advantages(rewards: Tensor, group_ids: Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
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
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
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


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
        loss [N, L], ratio [N, L], clipped_low [N, L] bool, clipped_high [N, L] bool. The masks
        mark tokens whose gradient the clip removed: ratio below 1 - clip_low with A < 0, and
        ratio above 1 + clip_high with A > 0.
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
    return loss, ratio.detach(), clipped_low, clipped_high


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: exp(q - p) - (q - p) - 1.

    With p = log pi_theta(a) and q = log pi_ref(a), a ~ pi_theta. Non-negative, unbiased.
    The log-ratio is clamped to +-20 so one outlier token cannot overflow.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # [N, L]
    return torch.expm1(log_ratio) - log_ratio


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: Normalizer) -> Tensor:
    """Reduce per-token values [N, L] over kept tokens to this micro-batch's share of the loss.

    Each mode is defined at the optimizer-step level: the micro-batch contributions summed over
    micro-batches (and averaged by DDP over ranks) give exactly the full-batch value, because the
    denominators come from ``norm`` (global counts), never from the micro-batch.

    - ``seq_mean_token_mean`` (GRPO, DeepSeekMath): mean over sequences of each sequence's token
      mean; a sequence with no kept token contributes 0 but still counts in the mean.
    - ``seq_mean_token_sum_norm`` (Dr.GRPO): sum of kept token values / ``norm.max_len``, mean over sequences.
    - ``token_mean`` (DAPO): sum over every kept token / global kept-token count.
    """
    mask_f = mask.to(values.dtype)  # [N, L]
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask_f).sum(dim=1) / mask_f.sum(dim=1).clamp(min=1.0)  # [N]
        total = per_seq.sum() / norm.num_sequences
    elif mode == "seq_mean_token_sum_norm":
        if norm.max_len is None:
            raise ValueError("aggregation 'seq_mean_token_sum_norm' needs Normalizer.max_len (the constant L)")
        total = (values * mask_f).sum() / (norm.max_len * norm.num_sequences)
    elif mode == "token_mean":
        total = (values * mask_f).sum() / max(norm.num_tokens, 1.0)
    else:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")
    return total * norm.world_size


def truncated_importance_weight(old_logprobs: Tensor, behavior_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance weight min(pi_old / pi_behavior, cap) per token, detached (Yao et al. 2025, TIS).

    Corrects for the sampling engine's logprobs differing from the trainer's (vLLM kernels, bf16):
    the samples come from pi_behavior while the surrogate is written for pi_old.
    """
    log_ratio = (old_logprobs - behavior_logprobs).clamp(max=20.0)  # [N, L]
    return torch.exp(log_ratio).clamp(max=cap).detach()


def zero_std_group_fraction(rewards: Tensor, group_ids: Tensor, tol: float = CONSTANT_TOL) -> Tensor:
    """Fraction of groups whose rewards all agree (max - min <= tol): their advantages are 0."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    hi = torch.full((num_groups,), -torch.inf, device=rewards.device).scatter_reduce(
        0, inverse, rewards.float(), "amax"
    )
    lo = torch.full((num_groups,), torch.inf, device=rewards.device).scatter_reduce(0, inverse, rewards.float(), "amin")
    return ((hi - lo) <= tol).float().mean() if num_groups else torch.zeros(())


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over True entries of ``mask`` (0 when the mask is empty)."""
    mask_f = mask.to(values.dtype)
    return (values * mask_f).sum() / mask_f.sum().clamp(min=1.0)
