"""Scoring forward passes: per-token logprobs, entropies and LM-head inputs of sampled responses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ForwardOut:
    """What one scoring pass returns for n rows."""

    logprobs: Tensor  # [n, L] log pi(a_t | s_t), fp32, with grad when the pass had grad
    entropy: Tensor  # [n, L] entropy of pi(. | s_t), fp32, detached
    hidden: Tensor | None  # [n, L, d] LM-head input (after the final norm), detached; None unless asked


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[n, T] positions that skip left padding, matching what ``generate`` used."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def score_responses(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_len: int, need_hidden: bool = False
) -> ForwardOut:
    """Run ``model`` on prompt + response and read the distribution at each response position.

    Position ``P + j`` holds response token ``j``; its distribution comes from the logits at
    ``P + j - 1``. Only the last L + 1 positions of logits are materialized. The hidden states are
    captured as the LM head's input (after the final norm) by a hook, which works whatever the model
    returns for ``output_hidden_states`` (transformers 5 returns None for a model unpickled in a
    spawned process) and keeps no other layer's activations.

    Args:
        model: a transformers causal LM.
        input_ids: [n, P+L] long.
        attention_mask: [n, P+L] bool.
        response_len: L.
        need_hidden: also return the LM-head input of the response positions.
    """
    captured: list[Tensor] = []
    handle = None
    if need_hidden:  # read the LM-head input directly: no per-layer hidden states are kept
        head = model.get_output_embeddings()
        handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=response_len + 1,
        )
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits[:, :-1, :].float()  # [n, L, V]
    actions = input_ids[:, -response_len:]  # [n, L]
    logprobs = selective_logprobs(logits, actions)  # [n, L]
    with torch.no_grad():
        entropy = token_entropy(logits)  # [n, L]
    hidden = captured[-1][:, -response_len - 1 : -1, :] if need_hidden else None  # [n, L, d]
    return ForwardOut(logprobs=logprobs, entropy=entropy, hidden=hidden)


def selective_logprobs(logits: Tensor, actions: Tensor) -> Tensor:
    """log softmax(logits)[action] without keeping a second [n, L, V] tensor: x_a - logsumexp(x)."""
    picked = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [n, L]
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension -> [n, L]."""
    logp = torch.log_softmax(logits, dim=-1)  # [n, L, V]
    return -(logp.exp() * logp).sum(dim=-1)
