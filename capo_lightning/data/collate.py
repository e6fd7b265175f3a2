"""Pack engine completions into a :class:`~capo_lightning.batch.RolloutBatch`."""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning.batch import RolloutBatch, RolloutTexts
from capo_lightning.rollout.engine import Completion


def collate_completions(
    completions: list[Completion],
    rewards: list[float],
    group_ids: list[int],
    pad_id: int,
    policy_version: int,
    rollout_step: int = 0,
    prompts: list[str] | None = None,
    answers: list[str] | None = None,
    max_new_tokens: int | None = None,
) -> RolloutBatch:
    """Left-pad prompts to P, right-pad responses to L and stack everything into tensors.

    Args:
        completions: N completions, grouped by prompt.
        rewards: [N] rewards.
        group_ids: [N] prompt index of each completion.
        pad_id: token id used for padding (masked out everywhere).
        policy_version: optimizer step of the weights that generated the completions.
        rollout_step: data position of this batch.
        prompts: [N] formatted prompts, for logging.
        answers: [N] gold answers, for logging.
        max_new_tokens: the token budget the completions were sampled with.
    """
    input_ids, attention_mask, response_mask, logprobs = _padded(completions, pad_id)
    texts = None
    if prompts is not None and answers is not None:
        texts = RolloutTexts(
            prompts=prompts, completions=[c.text for c in completions], answers=answers
        )
    batch = RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        behavior_logprobs=logprobs,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.tensor(group_ids, dtype=torch.long),
        truncated=torch.tensor(
            [c.finish_reason == "length" for c in completions], dtype=torch.bool
        ),
        policy_version=policy_version,
        rollout_step=rollout_step,
        max_new_tokens=max_new_tokens,
        texts=texts,
    )
    batch.validate()
    return batch


def _padded(completions: list[Completion], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """input_ids, attention_mask [N, P+L] (prompts left padded to P, responses right padded to L),
    response_mask and behaviour logprobs [N, L]."""
    n = len(completions)
    p = max(len(c.prompt_ids) for c in completions)
    l = max(1, max(len(c.token_ids) for c in completions))
    input_ids = torch.full((n, p + l), pad_id, dtype=torch.long)  # [N, P+L]
    attention_mask = torch.zeros((n, p + l), dtype=torch.bool)  # [N, P+L]
    response_mask = torch.zeros((n, l), dtype=torch.bool)  # [N, L]
    logprobs = torch.zeros((n, l), dtype=torch.float32)  # [N, L]
    for i, c in enumerate(completions):
        k, m = len(c.prompt_ids), len(c.token_ids)
        input_ids[i, p - k : p] = torch.tensor(c.prompt_ids, dtype=torch.long)
        attention_mask[i, p - k : p] = True
        if m:
            input_ids[i, p : p + m] = torch.tensor(c.token_ids, dtype=torch.long)
            attention_mask[i, p : p + m] = True
            response_mask[i, :m] = True
            logprobs[i, :m] = torch.tensor(c.logprobs, dtype=torch.float32)
    return input_ids, attention_mask, response_mask, logprobs
