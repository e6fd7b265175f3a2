"""The rollout batch that flows from the DataModule into the LightningModule.

Shape legend (used in every shape comment of this package):

    B  prompts per optimizer step, per rank
    G  completions (samples) per prompt
    N  = B * G completions per step, per rank
    P  prompt length in tokens (left padded)
    L  response length in tokens (right padded)
    V  vocabulary size
    d  hidden size (the LM-head input)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class RolloutTexts:
    """Human-readable side of a batch, for logging only (never moved to a device)."""

    prompts: list[str]  # [N] formatted prompt (chat template applied), repeated G times
    completions: list[str]  # [N] decoded response
    answers: list[str]  # [N] gold answer


TENSOR_FIELDS = (
    "input_ids",
    "attention_mask",
    "response_mask",
    "behavior_logprobs",
    "rewards",
    "group_ids",
    "truncated",
)  # the per-row tensors of a RolloutBatch, moved and sliced together


@dataclass(frozen=True)
class RolloutBatch:
    """N completions of B prompts with their rewards, ready for one optimizer step.

    ``input_ids`` holds prompt and response side by side: the prompt left padded to P,
    the response right padded to L, so position ``P + j`` is response token ``j`` for every row.
    """

    input_ids: Tensor  # [N, P+L] long
    attention_mask: Tensor  # [N, P+L] bool
    response_mask: Tensor  # [N, L] bool, generated tokens incl. EOS, no padding
    behavior_logprobs: Tensor  # [N, L] float, logprob of each sampled token under the sampling engine
    rewards: Tensor  # [N] float
    group_ids: Tensor  # [N] long, index of the prompt within the step (groups never straddle ranks)
    truncated: Tensor  # [N] bool, hit max_new_tokens without EOS
    policy_version: int  # optimizer step of the weights that generated the batch
    rollout_step: int = 0  # index of this rollout batch in the run (the data position)
    max_new_tokens: int | None = None  # the token budget it was sampled with (Dr.GRPO's constant L); None: unknown
    texts: RolloutTexts | None = None
    stats: dict[str, float] = field(default_factory=dict)  # generation/reward timings and health, for logging

    @property
    def prompt_len(self) -> int:
        """P, the padded prompt length."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def num_completions(self) -> int:
        """N."""
        return self.input_ids.shape[0]

    @property
    def responses(self) -> Tensor:
        """[N, L] response token ids (the sampled actions)."""
        return self.input_ids[:, self.prompt_len :]

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Move every tensor field to ``device``; texts and stats stay on the host."""
        return replace(self, **{name: getattr(self, name).to(device) for name in TENSOR_FIELDS})

    def select(self, rows: Tensor) -> RolloutBatch:
        """A sub-batch of the given rows (a minibatch); ``rows`` is a [n] long index tensor."""
        return replace(self, **{name: getattr(self, name)[rows] for name in TENSOR_FIELDS}, texts=None)

    def validate(self) -> None:
        """Raise ValueError when shapes or dtypes disagree (cheap; called by the DataModule)."""
        n, total = self.input_ids.shape
        l = self.response_mask.shape[1]
        expected = {
            "attention_mask": (n, total),
            "response_mask": (n, l),
            "behavior_logprobs": (n, l),
            "rewards": (n,),
            "group_ids": (n,),
            "truncated": (n,),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"RolloutBatch.{name} has shape {got}, expected {shape}")
        if l > total:
            raise ValueError(f"RolloutBatch: response length {l} exceeds sequence length {total}")
        for name in ("attention_mask", "response_mask", "truncated"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"RolloutBatch.{name} must be bool, got {getattr(self, name).dtype}")
