"""A memory-bounded LM head: per-token logprobs, entropies and top-k ids straight from h W^T, in
token chunks.

The usual scoring path materialises logits [n, L, V], converts them to fp32 and builds log-softmax
temporaries of the same size (at V = 152k, n = 16, L = 1k that is 10 GB each). :func:`head_logprobs`
never does: it walks the tokens in chunks, so the largest temporary is one fp32 [chunk, V] logits
block, and keeps for the backward pass only its inputs and one log-normaliser per token. The
backward pass recomputes each chunk's logits (one extra h W^T per step, the price of not storing [T,
V]) and forms the gradient  d logp(a) / d logits = e_a - softmax(logits)  chunk by chunk.

Numerics match the materialised path: logits are computed in the autocast dtype when autocast is on
(as the model's own head would), else in the inputs' dtype, then read in fp32; the weight gradient
is accumulated in fp32 across chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

# elements of one fp32 [chunk, V] block: 16 MiB on CPU (cache- and allocator-friendly), 512 MiB on a
# GPU (large matmuls); other devices use the CPU figure
LOGIT_BUDGET = {"cpu": 2**22, "cuda": 2**27}


def head_chunk(num_vocab: int, device: torch.device) -> int:
    """Tokens per chunk so that one fp32 [chunk, V] logits block stays within the device's
    budget."""
    return max(1, LOGIT_BUDGET.get(device.type, LOGIT_BUDGET["cpu"]) // max(1, num_vocab))


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the model's own head would multiply in: autocast's if it is on, else the inputs'
    common dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _logits(hidden: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """[c, V] logits of a chunk in fp32 (fp64 for fp64 inputs), multiplied in ``dtype`` with
    autocast off."""
    with torch.autocast(hidden.device.type, enabled=False):
        return (hidden.to(dtype) @ weight.to(dtype).T).to(torch.promote_types(dtype, torch.float32))


class _HeadLogprobs(torch.autograd.Function):
    """logp(a_t) = x_a - logsumexp(x) of x = h_t W^T, chunked; entropy and top-k ids ride along,
    without grad."""

    @staticmethod
    def forward(ctx, hidden, weight, actions, chunk, topk, with_entropy):  # noqa: ANN001, ANN205
        num_tokens = hidden.shape[0]
        dtype = compute_dtype(hidden, weight)
        f32 = dict(device=hidden.device, dtype=torch.promote_types(dtype, torch.float32))
        logprobs, lse = torch.empty(num_tokens, **f32), torch.empty(num_tokens, **f32)
        entropy = torch.empty(num_tokens if with_entropy else 0, **f32)
        top_ids = torch.empty(num_tokens, topk, device=hidden.device, dtype=torch.long)
        for s in range(0, num_tokens, chunk):
            logits = _logits(hidden[s : s + chunk], weight, dtype)  # [c, V] fp32
            norm = torch.logsumexp(logits, dim=-1)  # [c]
            lse[s : s + chunk] = norm
            logprobs[s : s + chunk] = (
                logits.gather(1, actions[s : s + chunk, None]).squeeze(1) - norm
            )
            if topk:
                top_ids[s : s + chunk] = logits.topk(topk, dim=-1).indices
            if with_entropy:  # H = lse - E_p[x]
                probs = (logits - norm[:, None]).exp_()
                entropy[s : s + chunk] = norm - torch.linalg.vecdot(probs, logits)
        ctx.save_for_backward(hidden, weight, actions, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(entropy, top_ids)
        return logprobs, entropy, top_ids

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy, _grad_ids):  # noqa: ANN001, ANN205
        hidden, weight, actions, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype) if need_w else None
        )
        w = weight.to(ctx.dtype)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s : s + ctx.chunk], grad_logprobs[s : s + ctx.chunk].to(lse.dtype)
            logits = _logits(h, weight, ctx.dtype)  # recomputed: [T, V] is never stored
            grad_logits = logits.sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g p
            grad_logits.scatter_add_(1, actions[s : s + ctx.chunk, None], g[:, None])  # + g e_a
            grad_logits = grad_logits.to(ctx.dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                if need_h:
                    grad_h[s : s + ctx.chunk] = (grad_logits @ w).to(hidden.dtype)
                if need_w:
                    grad_w += grad_logits.T @ h.to(ctx.dtype)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    actions: Tensor,
    topk: int = 0,
    with_entropy: bool = True,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Logprobs of ``actions`` under softmax(hidden W^T), without materialising [T, V].

    Args:
        hidden: [..., d] LM-head inputs (differentiable).
        weight: [V, d] LM-head weight (differentiable).
        actions: [...] token ids, the shape of ``hidden`` without its last dimension.
        topk: also return the ids of each token's ``topk`` largest logits (0: none).
        with_entropy: also return each token's entropy (costs one more exp over each block).
        chunk: tokens per block; None sizes it from V and the device (:func:`head_chunk`).

    Returns:
        logprobs [...] fp32 (with grad), entropy [...] fp32 or None, top-k ids [..., topk] long or
        None; entropy and ids carry no gradient.
    """
    lead = actions.shape
    flat_h, flat_a = hidden.reshape(-1, hidden.shape[-1]), actions.reshape(-1)
    chunk = chunk or head_chunk(weight.shape[0], hidden.device)
    logprobs, entropy, ids = _HeadLogprobs.apply(flat_h, weight, flat_a, chunk, topk, with_entropy)
    return (
        logprobs.reshape(lead),
        entropy.reshape(lead) if with_entropy else None,
        ids.reshape(*lead, topk) if topk else None,
    )
