"""The clipped policy-gradient loss every objective here shares; subclasses only set its knobs."""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning import keys
from capo_lightning.objectives import functional
from capo_lightning.objectives.base import LossOutput, Normalizer, Objective


class ClippedPolicyGradient(Objective):
    """-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) [dual-clipped] + beta k3, aggregated by
    ``aggregation``.

    Not meant to be configured directly: GRPO, DrGRPO, DAPO and REINFORCE fix its knobs to their
    papers'.
    """

    scale_rewards: bool = True
    use_baseline: bool = True

    def __init__(
        self, eps: float, clip_low: float, clip_high: float, beta: float, dual_clip: float | None
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not 0 <= clip_low < 1 or clip_high < 0:
            raise ValueError(
                f"{name} needs 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}/{clip_high}"
            )
        if eps < 0:
            raise ValueError(f"{name} eps must be >= 0, got {eps}")
        if beta < 0:
            raise ValueError(f"{name} beta must be >= 0, got {beta}; use 0 to disable the KL term")
        if dual_clip is not None and dual_clip <= 1:
            raise ValueError(
                f"{name} dual_clip must be > 1 (verl uses 3 to 10), got {dual_clip}; None disables "
                "it"
            )
        self.eps, self.clip_low, self.clip_high, self.beta, self.dual_clip = (
            eps,
            clip_low,
            clip_high,
            beta,
            dual_clip,
        )

    def advantages(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """[N] advantages: raw rewards without a baseline, else group-centred (and std-scaled)."""
        if not self.use_baseline:
            return rewards.float().clone()
        return functional.group_advantages(
            rewards, group_ids, scale_by_std=self.scale_rewards, eps=self.eps
        )

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        ref_logprobs: Tensor | None,
        advantages: Tensor,
        mask: Tensor,
        norm: Normalizer,
        token_weights: Tensor | None = None,
    ) -> LossOutput:
        """Per-token clipped surrogate (x token weights, + beta KL), aggregated over the step."""
        surrogate = functional.clipped_surrogate(
            logprobs, old_logprobs, advantages, self.clip_low, self.clip_high, self.dual_clip
        )  # [n, L] each
        per_token = surrogate.loss
        if token_weights is not None:
            per_token = per_token * token_weights
        metrics: dict[str, Tensor] = {}
        if self.beta > 0:
            if ref_logprobs is None:
                raise ValueError(
                    f"{type(self).__name__} with beta > 0 needs ref_logprobs (the module builds a "
                    "reference)"
                )
            kl = functional.k3_kl(logprobs, ref_logprobs)  # [n, L]
            per_token = per_token + self.beta * kl
            metrics[keys.KL] = functional.masked_mean(kl.detach(), mask)
        loss = functional.aggregate(per_token, mask, self.aggregation, norm)
        with torch.no_grad():
            metrics[keys.CLIP_FRAC_LOW] = functional.masked_mean(
                surrogate.clipped_low.float(), mask
            )
            metrics[keys.CLIP_FRAC_HIGH] = functional.masked_mean(
                surrogate.clipped_high.float(), mask
            )
            metrics[keys.RATIO_MEAN] = functional.masked_mean(surrogate.ratio, mask)
        return LossOutput(loss=loss, metrics=metrics)
