"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300)."""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning.objectives import functional as F
from capo_lightning.objectives.base import LossOutput, Normalizer, Objective


class GRPO(Objective):
    """Group Relative Policy Optimization.

    J = (1/G) sum_i (1/|o_i|) sum_t [ min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) - beta KL_t ]

    with A_i = (R_i - mean_g R) / (std_g R + eps) over the G completions of a prompt, r the ratio
    pi_theta / pi_old per token and KL_t Schulman's k3 estimator against the frozen reference.
    The loss is the negative of J, aggregated as the mean over sequences of each sequence's mean
    over its kept tokens (``seq_mean_token_mean``); the mean over sequences runs over the whole
    optimizer step (all micro-batches and ranks).

    Departures and choices: ``eps`` defaults to 1e-4 and the std is Bessel-corrected, as in the CAPO
    official code (TRL at its pinned commit); a group of one completion gets advantage 0. With
    ``ppo_epochs = minibatches = 1`` the ratio is identically 1 and the clip never acts, as in the
    paper's runs.

    Args:
        scale_rewards: divide advantages by the group std (False gives mean-centred advantages).
        eps: added to the group std before dividing.
        clip_low: epsilon_low of the ratio clip.
        clip_high: epsilon_high of the ratio clip (set above clip_low for clip-higher).
        beta: coefficient of the k3 KL penalty to the reference model; 0 builds no reference.
    """

    aggregation = "seq_mean_token_mean"

    def __init__(
        self,
        scale_rewards: bool = True,
        eps: float = 1e-4,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        beta: float = 0.0,
    ) -> None:
        super().__init__()
        if clip_low < 0 or clip_high < 0:
            raise ValueError(f"GRPO clip_low/clip_high must be >= 0, got {clip_low}/{clip_high}")
        if beta < 0:
            raise ValueError(f"GRPO beta must be >= 0, got {beta}; use 0 to disable the KL term")
        self.scale_rewards = scale_rewards
        self.eps = eps
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.beta = beta

    def advantages(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """[N] group-normalised advantages."""
        return F.group_advantages(rewards, group_ids, scale_by_std=self.scale_rewards, eps=self.eps)

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        ref_logprobs: Tensor | None,
        advantages: Tensor,
        mask: Tensor,
        norm: Normalizer,
    ) -> LossOutput:
        """Clipped surrogate (+ beta k3 KL) aggregated per sequence, then over the step."""
        per_token, ratio, low, high = F.clipped_surrogate(
            logprobs, old_logprobs, advantages, self.clip_low, self.clip_high
        )  # [n, L] each
        metrics: dict[str, Tensor] = {}
        if self.beta > 0:
            if ref_logprobs is None:
                raise ValueError("GRPO with beta > 0 needs ref_logprobs (the module builds a reference model)")
            kl = F.k3_kl(logprobs, ref_logprobs)  # [n, L]
            per_token = per_token + self.beta * kl
            metrics["objective/kl"] = F.masked_mean(kl.detach(), mask)
        loss = F.aggregate(per_token, mask, self.aggregation, norm)
        with torch.no_grad():
            metrics["objective/clip_frac_low"] = F.masked_mean(low.float(), mask)
            metrics["objective/clip_frac_high"] = F.masked_mean(high.float(), mask)
            metrics["objective/ratio_mean"] = F.masked_mean(ratio, mask)
        return LossOutput(loss=loss, metrics=metrics)
