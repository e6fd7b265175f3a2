"""The Objective contract: advantage estimator + per-token surrogate + normaliser (+ KL)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import Tensor, nn

from capo_lightning.objectives.functional import Normalizer

__all__ = ["LossOutput", "Normalizer", "Objective"]


@dataclass
class LossOutput:
    """What an objective returns: the loss to backpropagate and detached metrics for logging."""

    loss: Tensor  # scalar, this micro-batch's share of the step loss
    # objective/* key (capo_lightning.keys) -> detached scalar
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module, ABC):
    """Policy-gradient objective: how advantages are estimated and how the loss is aggregated.

    Subclasses differ only in advantage scaling, clip range, aggregation and KL; the math lives in
    :mod:`capo_lightning.objectives.functional`. An objective never decides which tokens count:
    that is the selector's job, delivered through ``mask``.
    """

    aggregation: str = "seq_mean_token_mean"
    """How per-token losses become the step loss: a key of ``functional.AGGREGATIONS``."""
    beta: float = 0.0
    """Coefficient of the KL term to the frozen reference; 0 builds no reference."""
    max_len: int | None = None
    """Constant L of the ``seq_mean_token_sum_norm`` aggregation; None = the batch's
    ``max_new_tokens``."""

    @property
    def needs_reference(self) -> bool:
        """True when the loss has a KL term to a frozen reference model."""
        return self.beta > 0

    @property
    def uses_clipping(self) -> bool:
        """True when the surrogate clips the ratio (only acts with ppo_epochs or minibatches >
        1)."""
        return True

    @abstractmethod
    def advantages(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """[N] rewards and group ids -> [N] (or [N, L]) advantages."""

    @abstractmethod
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
        """Loss of one micro-batch.

        Args:
            logprobs: [n, L] current policy logprobs of the sampled tokens (with grad).
            old_logprobs: [n, L] logprobs of the policy that the ratio compares against (detached).
            ref_logprobs: [n, L] reference-model logprobs, or None when ``needs_reference`` is
                False.
            advantages: [n] or [n, L].
            mask: [n, L] bool, tokens that enter the loss (response mask and selector mask
                combined).
            norm: global denominators of the step.
            token_weights: [n, L] detached per-token factors (e.g. truncated importance weights), or
                None.
        """
