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

from dataclasses import dataclass

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


BATCH_FIELDS = (
    *TENSOR_FIELDS,
    "policy_version",
    "rollout_step",
    "max_new_tokens",
    "texts",
    "stats",
)


class RolloutBatch:
    """N completions of B prompts with their rewards, ready for one optimizer step.

    ``input_ids`` holds prompt and response side by side: the prompt left padded to P,
    the response right padded to L, so position ``P + j`` is response token ``j`` for every row.

    An immutable record (change it with :meth:`replace`), and deliberately not a dataclass:
    Lightning walks dataclasses, dicts and lists with ``apply_to_collection``, and a true
    half-precision plugin (``bf16-true``, ``16-true``) casts every float tensor it finds to the
    model dtype (a frozen dataclass crashes it instead). The behaviour logprobs and rewards must
    stay fp32, so the batch is a leaf that moves itself (:meth:`to`) and is never cast.

    Fields:
        input_ids: [N, P+L] long.
        attention_mask: [N, P+L] bool.
        response_mask: [N, L] bool, generated tokens incl. EOS, no padding.
        behavior_logprobs: [N, L] float, logprob of each sampled token under the sampling engine.
        rewards: [N] float.
        group_ids: [N] long, index of the prompt within the step (groups never straddle ranks).
        truncated: [N] bool, hit max_new_tokens without EOS.
        policy_version: optimizer step of the weights that generated the batch.
        rollout_step: index of this rollout batch in the run (the data position).
        max_new_tokens: the token budget it was sampled with (Dr.GRPO's constant L); None: unknown.
        texts: the human-readable side, for logging.
        stats: generation/reward timings and health, for logging.
    """

    __slots__ = BATCH_FIELDS
    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    behavior_logprobs: Tensor
    rewards: Tensor
    group_ids: Tensor
    truncated: Tensor
    policy_version: int
    rollout_step: int
    max_new_tokens: int | None
    texts: RolloutTexts | None
    stats: dict[str, float]

    def __init__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        behavior_logprobs: Tensor,
        rewards: Tensor,
        group_ids: Tensor,
        truncated: Tensor,
        policy_version: int,
        rollout_step: int = 0,
        max_new_tokens: int | None = None,
        texts: RolloutTexts | None = None,
        stats: dict[str, float] | None = None,
    ) -> None:
        values = (
            input_ids,
            attention_mask,
            response_mask,
            behavior_logprobs,
            rewards,
            group_ids,
            truncated,
        )
        values += (
            policy_version,
            rollout_step,
            max_new_tokens,
            texts,
            {} if stats is None else stats,
        )
        for name, value in zip(BATCH_FIELDS, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RolloutBatch is immutable: use batch.replace({name}=...)")

    def __reduce__(self) -> tuple:
        return (RolloutBatch, tuple(getattr(self, name) for name in BATCH_FIELDS))

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}={tuple(getattr(self, name).shape)}" for name in TENSOR_FIELDS[:1]
        )
        return (
            f"RolloutBatch(N={self.num_completions}, {shapes}, "
            f"policy_version={self.policy_version})"
        )

    def replace(self, **changes: object) -> RolloutBatch:
        """A copy with the given fields changed (like ``dataclasses.replace``)."""
        unknown = sorted(set(changes) - set(BATCH_FIELDS))
        if unknown:
            raise TypeError(f"RolloutBatch has no field(s) {unknown}; fields: {list(BATCH_FIELDS)}")
        return RolloutBatch(**{**{name: getattr(self, name) for name in BATCH_FIELDS}, **changes})

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
        return self.replace(**{name: getattr(self, name).to(device) for name in TENSOR_FIELDS})

    def select(self, rows: Tensor) -> RolloutBatch:
        """A sub-batch of the given rows (a minibatch); ``rows`` is a [n] long index tensor."""
        return self.replace(
            **{name: getattr(self, name)[rows] for name in TENSOR_FIELDS}, texts=None
        )

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
                raise ValueError(
                    f"RolloutBatch.{name} must be bool, got {getattr(self, name).dtype}"
                )
