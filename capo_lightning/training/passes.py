"""Forward passes of a step: the policy's scoring forward over some rows, the no-grad scoring pass,
the reference model's logprobs, and how rows are grouped into micro-batches and put back in
order."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capo_lightning.batch import RolloutBatch
from capo_lightning.models.forward import ForwardOut, score_responses
from capo_lightning.models.lora import adapters_off
from capo_lightning.models.policy import lm_head_weight
from capo_lightning.training.context import StepContext


def policy_forward(
    ctx: StepContext,
    batch: RolloutBatch,
    rows: Tensor | None = None,
    need_hidden: bool = False,
    topk: int = 0,
    need_entropy: bool = True,
) -> ForwardOut:
    """The policy's logprobs (entropies, LM-head inputs, top-k ids) of the batch's responses, for
    ``rows`` or all."""
    ids, attn = _rows(batch.input_ids, rows), _rows(batch.attention_mask, rows)
    length = batch.response_mask.shape[1]
    return score_responses(ctx.policy, ids, attn, length, need_hidden, topk, need_entropy)


def needs_forward(ctx: StepContext) -> bool:
    """Whether the selector reads a forward pass (False: the mask is known before any forward)."""
    return ctx.selector is not None and ctx.selector.needs_forward


def needs_hidden(ctx: StepContext) -> bool:
    """Whether the forward must return LM-head inputs (the selector reads them)."""
    return ctx.selector is not None and ctx.selector.needs_hidden


def forward_topk(ctx: StepContext) -> int:
    """How many top logit ids per token the forward hands the selector (0 when it wants none or all
    of V)."""
    k = ctx.selector.forward_topk if ctx.selector is not None else 0
    return k if 0 < k < lm_head_weight(ctx.policy).shape[0] else 0


def scoring_pass(ctx: StepContext, batch: RolloutBatch, chunks: list[Tensor]) -> ForwardOut:
    """A no-grad pass over all rows, in micro-batches, computing only logprobs and what the selector
    reads."""
    with torch.no_grad():
        parts = [
            policy_forward(
                ctx,
                batch,
                rows,
                need_hidden=needs_hidden(ctx),
                topk=forward_topk(ctx),
                need_entropy=False,
            )
            for rows in chunks
        ]
    return ForwardOut(
        logprobs=in_row_order([p.logprobs for p in parts], chunks),
        entropy=None,
        hidden=in_row_order([p.hidden for p in parts], chunks)
        if parts[0].hidden is not None
        else None,
        topk_ids=in_row_order([p.topk_ids for p in parts], chunks)
        if parts[0].topk_ids is not None
        else None,
    )


def row_lengths(batch: RolloutBatch) -> Tensor:
    """[N] tokens each row attends to (prompt + response), on the host: what micro-batches are
    grouped by."""
    return batch.attention_mask.sum(dim=1).cpu()


def in_row_order(parts: list[Tensor], chunks: list[Tensor]) -> Tensor:
    """The per-chunk results ``parts`` (rows ``chunks[i]``) as one tensor in row order 0..N-1."""
    rows = torch.cat(chunks).to(parts[0].device)
    out = torch.empty(
        (rows.numel(), *parts[0].shape[1:]), device=parts[0].device, dtype=parts[0].dtype
    )
    out[rows] = torch.cat(parts)
    return out


def _rows(tensor: Tensor | None, rows: Tensor | None) -> Tensor | None:
    """``tensor[rows]`` (None rows: all of it; None tensor: None)."""
    return tensor if tensor is None or rows is None else tensor[rows]


def reference_logprobs(
    reference: nn.Module, batch: RolloutBatch, micro_batch_size: int | None = None
) -> Tensor:
    """[N, L] logprobs of the frozen reference model (moved to the batch's device on first use), in
    forwards of at most ``micro_batch_size`` rows (None: one forward), so its activations are
    bounded like the policy's."""
    device = batch.input_ids.device
    if next(reference.parameters()).device != device:
        reference.to(device)
    rows, length = batch.num_completions, batch.response_mask.shape[1]
    size = micro_batch_size or rows
    # a LoRA policy as its own reference: the base model
    with torch.no_grad(), adapters_off(reference):
        parts = [
            score_responses(
                reference, batch.input_ids[i : i + size], batch.attention_mask[i : i + size], length
            )
            for i in range(0, rows, size)
        ]
    return torch.cat([part.logprobs for part in parts])
