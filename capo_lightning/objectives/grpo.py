"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300)."""

from __future__ import annotations

from capo_lightning.objectives.pg import ClippedPolicyGradient


class GRPO(ClippedPolicyGradient):
    """Group Relative Policy Optimization.

    J = (1/G) sum_i (1/|o_i|) sum_t [ min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) - beta KL_t
    ]

    with A_i = (R_i - mean_g R) / (std_g R + eps) over the G completions of a prompt, r the ratio
    pi_theta / pi_old per token and KL_t Schulman's k3 estimator against the frozen reference.
    The loss is -J, aggregated as the mean over sequences of each sequence's mean over its kept
    tokens (``seq_mean_token_mean``; TRL ``loss_type="grpo"``, verl ``seq-mean-token-mean``), where
    the mean over sequences runs over the whole optimizer step (all micro-batches and ranks).

    Choices: ``eps`` = 1e-4 and the Bessel-corrected std, as in the CAPO official code (TRL at its
    pinned commit); a group of one completion gets advantage 0; a sequence whose tokens are all
    masked (e.g. by CAPO) contributes 0 but still counts in the mean over sequences. With
    ``ppo_epochs = minibatches = 1`` the ratio is identically 1 and the clip never acts, as in the
    paper's runs.

    Args:
        scale_rewards: divide advantages by the group std (False gives mean-centred advantages).
        eps: added to the group std before dividing.
        clip_low: epsilon_low of the ratio clip.
        clip_high: epsilon_high of the ratio clip (set above clip_low for clip-higher).
        beta: coefficient of the k3 KL penalty to the reference model; 0 builds no reference.
        dual_clip: cap c of the loss of negative-advantage tokens (-c A); None disables it.
    """

    aggregation = "seq_mean_token_mean"

    def __init__(
        self,
        scale_rewards: bool = True,
        eps: float = 1e-4,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        beta: float = 0.0,
        dual_clip: float | None = None,
    ) -> None:
        super().__init__(
            eps=eps, clip_low=clip_low, clip_high=clip_high, beta=beta, dual_clip=dual_clip
        )
        self.scale_rewards = scale_rewards
