"""Skip optimizer steps whose loss or gradient is not finite, identically on every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class NonFiniteGuard:
    """Decides whether an optimizer step may go ahead, and skips it when it may not.

    A skipped step drops the gradient and takes an empty ``optimizer.step()`` (every grad is None,
    so weights and Adam moments stay as they were) and a scheduler step: it still counts towards
    ``max_steps`` and the schedule, so a run cannot stall. ``max_consecutive_skips`` skips in a row
    raise ``FloatingPointError``: the last checkpoint then holds the last finite weights.

    Args:
        max_consecutive_skips: how many skipped steps in a row stop the run.
    """

    def __init__(self, max_consecutive_skips: int) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0  # over the run; checkpointed by the module
        self.consecutive_skips = 0

    @staticmethod
    def any_rank_non_finite(
        loss: Tensor, sum_over_ranks: Callable[[Tensor], Tensor] | None
    ) -> bool:
        """True when ``loss`` is not finite on this rank or any other; every rank gets the same
        answer, so all of them skip together (one rank skipping alone would hang DDP's
        all-reduce)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if sum_over_ranks is not None:
            bad = sum_over_ranks(bad)
        return bool(bad > 0)

    def stepped(self) -> None:
        """Record a step that went ahead."""
        self.consecutive_skips = 0

    def skip(self, optimizer: Any, scheduler: Any | None, what: str, rollout_step: int) -> None:
        """Drop the gradient and take an empty step; raise after too many in a row.

        Args:
            optimizer: the (Lightning-wrapped) optimizer.
            scheduler: the lr scheduler, or None.
            what: "loss" or "gradient", for the messages.
            rollout_step: the rollout step being trained, for the messages.
        """
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()  # every grad is None: torch optimizers leave such parameters untouched
        if scheduler is not None:
            scheduler.step()
        self.skipped_steps += 1
        self.consecutive_skips += 1
        rank_zero_warn(
            f"capo: non-finite {what} at rollout step {rollout_step}; update skipped, weights "
            "unchanged"
        )
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self.consecutive_skips} consecutive optimizer steps had a non-finite {what}; "
                "stopping. The last checkpoint holds the last finite weights; lower the learning "
                "rate (model.optimizer.init_args.lr) or raise model.max_consecutive_skips"
            )
