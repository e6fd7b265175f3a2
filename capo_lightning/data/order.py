"""Which training prompt comes when: a pure function of (seed, rollout step, rank, slot), so resume
is exact."""

from __future__ import annotations

import torch

from capo_lightning.data.prompts import PromptItem, PromptSource

REFILL_OFFSET = 10**12
"""Unbounded sources: the dynamic-sampling refill stream starts this far above any training
index."""


class PromptOrder:
    """The training prompt order of a run.

    Prompt ``j`` of rollout step ``k`` on rank ``r`` (of ``W``) is the source's item number
    ``(k W + r) B + j`` of stream 0. A finite source is read in a fresh seeded permutation each
    epoch; an unbounded one is read in order. Dynamic sampling's refill prompts come from stream 1,
    a second permutation (or, unbounded, indices above :data:`REFILL_OFFSET`), so they never repeat
    the step's own prompts.

    Args:
        source: the training prompt source.
        seed: seeds the permutations.
        prompts_per_step: B.
        max_sampling_rounds: generation rounds per step at most (refill rounds are 1 .. this - 1).
    """

    def __init__(
        self, source: PromptSource, seed: int, prompts_per_step: int, max_sampling_rounds: int
    ) -> None:
        self.source, self.seed = source, seed
        self.prompts_per_step, self.max_sampling_rounds = prompts_per_step, max_sampling_rounds
        # (stream, epoch) -> permutation, one epoch per stream
        self._perms: dict[tuple[int, int], list[int]] = {}

    def train_item(self, step: int, slot: int, rank: int, world: int) -> PromptItem:
        """Prompt ``slot`` of rollout step ``step`` on ``rank`` of ``world``."""
        index = (step * world + rank) * self.prompts_per_step + slot
        return self._item(index, stream=0)

    def refill_item(self, step: int, round_: int, slot: int, rank: int, world: int) -> PromptItem:
        """Prompt ``slot`` of dynamic-sampling round ``round_`` (>= 1) of rollout step ``step``."""
        rounds = max(1, self.max_sampling_rounds - 1)
        index = ((step * rounds + round_ - 1) * world + rank) * self.prompts_per_step + slot
        return self._item(index, stream=1)

    def _item(self, index: int, stream: int) -> PromptItem:
        size = self.source.size
        if size is None:
            return self.source.item(index + stream * REFILL_OFFSET)
        epoch, position = divmod(index, size)
        return self.source.item(self._permutation(stream, epoch, size)[position])

    def _permutation(self, stream: int, epoch: int, size: int) -> list[int]:
        key = (stream, epoch)
        if key not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919 * stream)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != stream}
            self._perms[key] = torch.randperm(size, generator=generator).tolist()
        return self._perms[key]
