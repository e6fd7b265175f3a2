"""The Objective contract: advantage estimator + per-token surrogate + normaliser (+ KL)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


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
        """Count sequences and kept tokens in ``mask`` [N, L], summed over ranks by ``all_reduce``."""
        counts = torch.tensor([float(mask.shape[0]), float(mask.sum())], dtype=torch.float64, device=mask.device)
        if all_reduce is not None:
            counts = all_reduce(counts)
        return cls(num_sequences=float(counts[0]), num_tokens=float(counts[1]), world_size=world_size, max_len=max_len)

    def denominator(self, aggregation: str) -> float:
        """The resolved denominator of ``aggregation`` (logged as ``objective/normalizer``)."""
        if aggregation == "token_mean":
            return self.num_tokens
        if aggregation == "seq_mean_token_sum_norm":
            return float(self.max_len or 0) * self.num_sequences
        return self.num_sequences


@dataclass
class LossOutput:
    """What an objective returns: the loss to backpropagate and detached metrics for logging."""

    loss: Tensor  # scalar, this micro-batch's share of the step loss
    metrics: dict[str, Tensor] = field(default_factory=dict)  # "objective/..." -> detached scalar


class Objective(nn.Module, ABC):
    """Policy-gradient objective: how advantages are estimated and how the loss is aggregated.

    Subclasses differ only in advantage scaling, clip range, aggregation and KL; the math lives in
    :mod:`capo_lightning.objectives.functional`. An objective never decides which tokens count:
    that is the selector's job, delivered through ``mask``.
    """

    aggregation: str = "seq_mean_token_mean"
    beta: float = 0.0

    @property
    def needs_reference(self) -> bool:
        """True when the loss has a KL term to a frozen reference model."""
        return self.beta > 0

    @property
    def uses_clipping(self) -> bool:
        """True when the surrogate clips the ratio (only acts with ppo_epochs or minibatches > 1)."""
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
            ref_logprobs: [n, L] reference-model logprobs, or None when ``needs_reference`` is False.
            advantages: [n] or [n, L].
            mask: [n, L] bool, tokens that enter the loss (response mask and selector mask combined).
            norm: global denominators of the step.
            token_weights: [n, L] detached per-token factors (e.g. truncated importance weights), or None.
        """
