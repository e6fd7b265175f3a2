"""Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv
2503.20783)."""

from __future__ import annotations

from capo_lightning.objectives.pg import ClippedPolicyGradient


class DrGRPO(ClippedPolicyGradient):
    """GRPO done right: no std scaling and no per-sequence length normalisation.

    J = (1/G) sum_i (1/L) sum_t min(r A_i, clip(r, 1 - eps, 1 + eps) A_i),   A_i = R_i - mean_g R

    L is a constant: the generation budget (``data.sampling.max_new_tokens``) unless ``max_len`` is
    set, as in the authors' code (oat ``generate_max_length``; TRL ``loss_type="dr_grpo"``; verl
    ``seq-mean-token-sum-norm``). The 1/G mean runs over every sequence of the optimizer step.

    Departures: none in the loss. The CAPO code's Dr.GRPO used L = max_completion_length = 1024.

    Args:
        clip_low: epsilon_low of the ratio clip.
        clip_high: epsilon_high of the ratio clip.
        beta: k3 KL coefficient (the paper uses none).
        max_len: the constant L; None = the rollout's max_new_tokens.
        dual_clip: cap c of the loss of negative-advantage tokens; None disables it.
    """

    aggregation = "seq_mean_token_sum_norm"
    scale_rewards = False

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        beta: float = 0.0,
        max_len: int | None = None,
        dual_clip: float | None = None,
    ) -> None:
        super().__init__(
            eps=0.0, clip_low=clip_low, clip_high=clip_high, beta=beta, dual_clip=dual_clip
        )
        if max_len is not None and max_len < 1:
            raise ValueError(f"DrGRPO max_len must be >= 1, got {max_len}")
        self.max_len = max_len
