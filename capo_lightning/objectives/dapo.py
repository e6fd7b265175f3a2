"""DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv
2503.14476)."""

from __future__ import annotations

from capo_lightning.objectives.pg import ClippedPolicyGradient


class DAPO(ClippedPolicyGradient):
    """Decoupled clip and token-level policy gradient.

    J = (1 / sum_i |o_i|) sum_i sum_t min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)

    with A_i = (R_i - mean_g R) / (std_g R + eps), clip-higher eps_low = 0.2, eps_high = 0.28 and no
    KL term. The denominator is the number of kept tokens of the whole optimizer step, all ranks
    (``token_mean``; TRL ``loss_type="dapo"``, verl ``token-mean``). DAPO's two other parts live
    where they act: dynamic sampling in the DataModule (``data.dynamic_sampling``), overlong reward
    shaping as a reward wrapper (:class:`capo_lightning.rewards.shaping.OverlongPenalty`) and
    overlong filtering as ``model.mask_truncated``.

    Departures: ``eps`` = 1e-6 (verl's default; the paper gives none). The dual clip verl's DAPO
    recipe adds (c = 10) is off by default, as in the paper.

    Args:
        clip_low: epsilon_low.
        clip_high: epsilon_high (clip-higher).
        eps: added to the group std before dividing.
        beta: k3 KL coefficient (DAPO removes it: 0).
        dual_clip: cap c of the loss of negative-advantage tokens; None disables it.
    """

    aggregation = "token_mean"

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        eps: float = 1e-6,
        beta: float = 0.0,
        dual_clip: float | None = None,
    ) -> None:
        super().__init__(
            eps=eps, clip_low=clip_low, clip_high=clip_high, beta=beta, dual_clip=dual_clip
        )
