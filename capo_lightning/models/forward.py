"""Scoring forward passes: per-token logprobs, entropies, top-k ids and LM-head inputs of sampled
responses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from capo_lightning.faults import inject
from capo_lightning.models.lm_head import head_chunk, head_logprobs

# config fields of models whose forward changes the head's output (Gemma 2/3, Cohere, Granite):
# those are scored from materialised logits
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class ForwardOut:
    """What one scoring pass returns for n rows."""

    logprobs: Tensor  # [n, L] log pi(a_t | s_t), fp32, with grad when the pass had grad
    entropy: Tensor | None  # [n, L] entropy of pi(. | s_t), fp32, detached; None unless asked
    # [n, L, d] LM-head input (after the final norm), detached; None unless asked
    hidden: Tensor | None = None
    topk_ids: Tensor | None = None  # [n, L, k] ids of the k largest logits, long; None unless asked


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[n, T] positions that skip left padding, matching what ``generate`` used."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def fusable_head(model: nn.Module) -> bool:
    """Whether the model's logits are exactly its output embedding's ``h W^T`` (a bias-free Linear,
    nothing after)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    config = getattr(model, "config", None)
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def score_responses(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    need_hidden: bool = False,
    topk: int = 0,
    need_entropy: bool = True,
) -> ForwardOut:
    """Run ``model`` on prompt + response and read the distribution at each response position.

    Position ``P + j`` holds response token ``j``; its distribution comes from the logits at
    ``P + j - 1``. The LM head is taken over by two hooks for the call: the model computes its
    hidden states as usual, and the head's input goes
    to :func:`~capo_lightning.models.lm_head.head_logprobs`, so no [n, L, V] logits tensor exists
    (memory-bounded, one [chunk, V] block at a time). Hooks rather than a separate decoder call keep
    every wrapper's own hooks (FSDP2 unsharding, DDP) working. The hidden states are that same head
    input, which works whatever the model returns for ``output_hidden_states``. Models whose logits
    are not a plain ``h W^T`` (:func:`fusable_head`) are scored from materialised logits in chunks
    instead. Columns no row attends to are cut before the forward (:func:`trim_padding`; the outputs
    are zero-padded back to L), so a micro-batch of short rows costs what its rows need.

    Args:
        model: a transformers causal LM.
        input_ids: [n, P+L] long.
        attention_mask: [n, P+L] bool.
        response_len: L.
        need_hidden: also return the LM-head input of the response positions.
        topk: also return the ids of the ``topk`` largest logits at each response position (0:
            none).
        need_entropy: also return the entropies (one more exp over the logits).
    """
    inject("forward")
    input_ids, attention_mask, kept = trim_padding(input_ids, attention_mask, response_len)
    actions = input_ids[:, -kept:]  # [n, L']
    fused = fusable_head(model)
    seen: dict[str, object] = {}
    handles = _take_over_head(
        model.get_output_embeddings(), actions, fused, seen, topk, need_entropy
    )
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=kept + 1,
        )
    finally:
        for handle in handles:
            handle.remove()
    if fused:
        _, entropy, ids = seen["scores"]
        logprobs = out.logits.squeeze(-1)
    else:
        logprobs, entropy, ids = logits_scores(out.logits[:, :-1], actions, topk, need_entropy)
    hidden = seen["hidden"][:, :-1].detach() if need_hidden else None
    fields = [_pad_to(t, response_len) for t in (logprobs, entropy, hidden, ids)]
    return ForwardOut(*fields)


def trim_padding(
    input_ids: Tensor, attention_mask: Tensor, response_len: int
) -> tuple[Tensor, Tensor, int]:
    """Drop the columns no row attends to (leading prompt padding, trailing response padding):
    exact, since positions follow the mask and attention is causal. Returns the trimmed ids and mask
    and L' <= L."""
    # the kept span lies between the first and last used column
    used = attention_mask.any(dim=0).nonzero()
    prompt_len = input_ids.shape[1] - response_len
    first = min(int(used[0]), prompt_len - 1) if used.numel() else 0
    last = max(int(used[-1]) + 1, prompt_len + 1) if used.numel() else input_ids.shape[1]
    return input_ids[:, first:last], attention_mask[:, first:last], last - prompt_len


def _pad_to(tensor: Tensor | None, length: int) -> Tensor | None:
    """Right-pad dimension 1 of a scored tensor with zeros back to the batch's L (positions no row
    has)."""
    if tensor is None or tensor.shape[1] == length:
        return tensor
    pad = torch.zeros(
        (tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]),
        device=tensor.device,
        dtype=tensor.dtype,
    )
    return torch.cat([tensor, pad], dim=1)


def _take_over_head(
    head: nn.Module, actions: Tensor, fused: bool, seen: dict, topk: int, need_entropy: bool
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that record the head's input in ``seen`` and, when ``fused``, score it
    with :func:`head_logprobs` instead of the head's own [n, L, V] product (the model then returns
    [n, L, 1] logprobs as its logits)."""

    def take_input(_module: nn.Module, args: tuple) -> tuple | None:
        seen["hidden"] = args[0]  # [n, L+1, d]
        return (args[0][:, :0],) if fused else None  # the head itself then computes nothing

    def score(module: nn.Module, _args: tuple, _output: Tensor) -> Tensor | None:
        if not fused:
            return None
        hidden = seen["hidden"][:, :-1]  # [n, L, d]: the last position predicts nothing we score
        seen["scores"] = head_logprobs(hidden, module.weight, actions, topk, need_entropy)
        # [n, L, 1]: the model's output carries it (for its wrappers)
        return seen["scores"][0].unsqueeze(-1)

    return [head.register_forward_pre_hook(take_input), head.register_forward_hook(score)]


def logits_scores(
    logits: Tensor, actions: Tensor, topk: int = 0, need_entropy: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Logprobs (with grad), entropies and top-k ids from materialised [n, L, V] logits, in row
    chunks of fp32."""
    logprobs = selective_logprobs(logits, actions)
    entropy, ids = None, None
    with torch.no_grad():
        step = max(1, head_chunk(logits.shape[-1], logits.device) // max(1, logits.shape[1]))
        if need_entropy:
            entropy = torch.cat([token_entropy(part.float()) for part in logits.split(step)])
        if topk:
            ids = torch.cat([part.topk(topk, dim=-1).indices for part in logits.split(step)])
    return logprobs, entropy, ids


def selective_logprobs(logits: Tensor, actions: Tensor) -> Tensor:
    """log softmax(logits)[action] in fp32 without a second [n, L, V] tensor: x_a - logsumexp(x),
    per row."""
    picked = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1).float()  # [n, L]
    return picked - torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension -> [...]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
