"""REINFORCE, the CAPO paper's third baseline (Williams 1992, as run in Melo et al. 2025)."""

from __future__ import annotations

from capo_lightning.objectives.pg import ClippedPolicyGradient


class REINFORCE(ClippedPolicyGradient):
    """Policy gradient with the raw reward as advantage: no baseline, no normalisation.

    J = (1/G) sum_i (1/|o_i|) sum_t min(r R_i, clip(r, 1 - eps, 1 + eps) R_i)

    i.e. GRPO's aggregation (``seq_mean_token_mean``) with A_i = R_i, as the CAPO code's
    ``grpo_nobaseline_trainer`` (``normalize_advantages: false``). With 0/1 rewards only correct
    completions push; wrong ones contribute nothing. With mu = 1 the ratio is 1 and this is exactly
    REINFORCE.

    Args:
        clip_low: epsilon_low of the ratio clip.
        clip_high: epsilon_high of the ratio clip.
        beta: k3 KL coefficient.
        dual_clip: cap c of the loss of negative-advantage tokens; None disables it.
    """

    aggregation = "seq_mean_token_mean"
    use_baseline = False

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        beta: float = 0.0,
        dual_clip: float | None = None,
    ) -> None:
        super().__init__(
            eps=0.0, clip_low=clip_low, clip_high=clip_high, beta=beta, dual_clip=dual_clip
        )
