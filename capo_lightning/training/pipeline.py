"""What runs on one rollout batch: forward, selection, normaliser, loss, backward and optimizer steps.

Two paths, chosen by :class:`~capo_lightning.training.plan.StepPlan`:

* **single update** (``ppo_epochs = minibatches = 1``; the paper's setting): one optimizer step, accumulated
  over micro-batches, and one forward per micro-batch. Each training forward's detached logprobs are the
  old logprobs (the ratio is exactly 1: no update happens in between). When one micro-batch holds the
  step, its forward also feeds the selector before the loss is aggregated; with several micro-batches a
  selector that reads a forward (``needs_forward``, e.g. CAPO) first gets a no-grad look-ahead pass that
  computes only what it reads (logprobs, LM-head inputs, top-k ids; no entropies), and a selector that
  reads none (KeepAll) decides before any forward, so no extra pass runs at all.
* **multi-pass**: a no-grad pass over every row first fixes the old logprobs and the selector's inputs,
  so the mask, and with it every normaliser, is final before any loss is computed; then ``ppo_epochs``
  passes of ``minibatches`` optimizer steps, each accumulated over micro-batches.

Either way the selector's mask is applied before the normaliser, so rejected tokens leave both the
numerator and the denominator, and normalisers count the whole step on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from capo_lightning.batch import RolloutBatch
from capo_lightning.forward import ForwardOut, score_responses
from capo_lightning.objectives import Normalizer, Objective
from capo_lightning.objectives.functional import masked_mean, truncated_importance_weight
from capo_lightning.parallel import full_tensor
from capo_lightning.policy import lm_head_weight
from capo_lightning.selection import Selection, Selector, TokenView
from capo_lightning.training.guard import NonFiniteGuard
from capo_lightning.training.plan import StepPlan
from capo_lightning.training.step_metrics import accumulate


@dataclass
class StepContext:
    """Everything one rollout batch's step uses, gathered by the module at the start of the step."""

    policy: nn.Module
    objective: Objective
    selector: Selector | None
    guard: NonFiniteGuard
    backward: Callable[[Tensor], None]  # the module's manual_backward
    optimizer: Any  # Lightning-wrapped optimizer
    scheduler: Any | None  # stepped once per optimizer step
    sum_over_ranks: Callable[[Tensor], Tensor] | None  # None in one process
    world_size: int
    max_grad_norm: float | None
    tis_cap: float | None
    rollout_step: int  # for messages

    @property
    def lr(self) -> float:
        """The learning rate the coming optimizer step will use."""
        return float(self.optimizer.param_groups[0]["lr"])


def single_update_step(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan, metrics: dict
) -> Selection:
    """``ppo_epochs = minibatches = 1``: one optimizer step over micro-batches, one training forward each."""
    chunks = plan.chunks(batch.num_completions, row_lengths(batch))
    whole = len(chunks) == 1  # one micro-batch holds the step: its forward also feeds the selector
    selection, mask = None, None
    if not needs_forward(ctx):
        selection, mask = select_tokens(ctx, batch, adv, None, None, None)
    elif not whole:  # the mask must be final before the first loss: look ahead without grad
        ahead = scoring_pass(ctx, batch, chunks)
        selection, mask = select_tokens(ctx, batch, adv, ahead.logprobs, ahead.hidden, ahead.topk_ids)
    olds, norm, loss = [], None, None
    for rows in [None] if whole else chunks:
        feed = mask is None
        topk = forward_topk(ctx) if feed else 0
        out = policy_forward(ctx, batch, rows, need_hidden=feed and needs_hidden(ctx), topk=topk)
        old = out.logprobs.detach()
        olds.append(old)
        if feed:
            selection, mask = select_tokens(ctx, batch, adv, old, out.hidden, out.topk_ids)
        if norm is None:
            norm = normalizer(ctx, batch, mask)
            metrics["objective/normalizer"] = denominator(ctx, norm)
        r_mask = _rows(mask, rows)
        loss_out = ctx.objective(
            out.logprobs, old, _rows(ref, rows), _rows(adv, rows), r_mask, norm,
            tis_weights(ctx, old, _rows(batch.behavior_logprobs, rows)),
        )  # fmt: skip
        share = 1.0 if whole else float(r_mask.sum()) / max(float(mask.sum()), 1.0)
        accumulate(metrics, loss_out.metrics, share)
        accumulate(metrics, {"objective/entropy": masked_mean(out.entropy, r_mask)}, share)
        accumulate(metrics, {"objective/loss": loss_out.loss.detach()}, 1.0)  # the step's loss: the sum
        loss = loss_out.loss
        if not whole:
            ctx.backward(loss)
    backward_and_step(ctx, loss if whole else None, metrics)
    metrics["rollout/engine_trainer_logprob_gap"] = masked_mean(
        (in_row_order(olds, chunks) - batch.behavior_logprobs).abs(), batch.response_mask
    )
    return selection


def multi_pass_step(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan, metrics: dict
) -> Selection:
    """A no-grad pass fixes old logprobs and the mask; then ``ppo_epochs`` x ``minibatches`` optimizer steps."""
    ahead = scoring_pass(ctx, batch, plan.chunks(batch.num_completions, row_lengths(batch)))
    old = ahead.logprobs  # [N, L]
    selection, mask = select_tokens(ctx, batch, adv, old, ahead.hidden, ahead.topk_ids)
    metrics["rollout/engine_trainer_logprob_gap"] = masked_mean(
        (old - batch.behavior_logprobs).abs(), batch.response_mask
    )
    num_updates = plan.ppo_epochs * len(plan.minibatch_rows(0))
    for epoch in range(plan.ppo_epochs):
        for mb_rows in plan.minibatch_rows(epoch):
            norm = normalizer(ctx, batch, mask[mb_rows])
            accumulate(
                metrics,
                {"objective/normalizer": denominator(ctx, norm)},
                1.0 / num_updates,
            )
            total = torch.zeros((), device=old.device, dtype=torch.float32)
            for rows in plan.micro_rows(mb_rows, row_lengths(batch)):
                out = policy_forward(ctx, batch, rows)
                r_ref = ref[rows] if ref is not None else None
                weights = tis_weights(ctx, old[rows], batch.behavior_logprobs[rows])
                loss_out = ctx.objective(out.logprobs, old[rows], r_ref, adv[rows], mask[rows], norm, weights)
                ctx.backward(loss_out.loss)
                total = total + loss_out.loss.detach()
                share = float(mask[rows].sum()) / max(float(mask.sum()), 1.0) / plan.ppo_epochs
                accumulate(metrics, loss_out.metrics, share)
                accumulate(metrics, {"objective/entropy": masked_mean(out.entropy, mask[rows])}, share)
            accumulate(metrics, {"objective/loss": total}, 1.0 / num_updates)
            backward_and_step(ctx, None, metrics, weight=1.0 / num_updates)
    return selection


def scoring_pass(ctx: StepContext, batch: RolloutBatch, chunks: list[Tensor]) -> ForwardOut:
    """A no-grad pass over all rows, in micro-batches, computing only logprobs and what the selector reads."""
    with torch.no_grad():
        parts = [
            policy_forward(ctx, batch, rows, need_hidden=needs_hidden(ctx), topk=forward_topk(ctx), need_entropy=False)
            for rows in chunks
        ]
    return ForwardOut(
        logprobs=in_row_order([p.logprobs for p in parts], chunks),
        entropy=None,
        hidden=in_row_order([p.hidden for p in parts], chunks) if parts[0].hidden is not None else None,
        topk_ids=in_row_order([p.topk_ids for p in parts], chunks) if parts[0].topk_ids is not None else None,
    )


def row_lengths(batch: RolloutBatch) -> Tensor:
    """[N] tokens each row attends to (prompt + response), on the host: what micro-batches are grouped by."""
    return batch.attention_mask.sum(dim=1).cpu()


def in_row_order(parts: list[Tensor], chunks: list[Tensor]) -> Tensor:
    """The per-chunk results ``parts`` (rows ``chunks[i]``) as one tensor in row order 0..N-1."""
    rows = torch.cat(chunks).to(parts[0].device)
    out = torch.empty((rows.numel(), *parts[0].shape[1:]), device=parts[0].device, dtype=parts[0].dtype)
    out[rows] = torch.cat(parts)
    return out


def _rows(tensor: Tensor | None, rows: Tensor | None) -> Tensor | None:
    """``tensor[rows]`` (None rows: all of it; None tensor: None)."""
    return tensor if tensor is None or rows is None else tensor[rows]


def policy_forward(
    ctx: StepContext,
    batch: RolloutBatch,
    rows: Tensor | None = None,
    need_hidden: bool = False,
    topk: int = 0,
    need_entropy: bool = True,
) -> ForwardOut:
    """The policy's logprobs (entropies, LM-head inputs, top-k ids) of the batch's responses, for ``rows`` or all."""
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
    """How many top logit ids per token the forward hands the selector (0 when it wants none or all of V)."""
    k = ctx.selector.forward_topk if ctx.selector is not None else 0
    return k if 0 < k < lm_head_weight(ctx.policy).shape[0] else 0


def select_tokens(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, old: Tensor | None, hidden: Tensor | None, topk: Tensor | None
) -> tuple[Selection, Tensor]:
    """The selector's decision and the final loss mask (response mask AND selection), [N, L] bool."""
    if ctx.selector is None:
        return Selection(token_mask=batch.response_mask), batch.response_mask
    view = TokenView(
        actions=batch.responses,
        response_mask=batch.response_mask,
        advantages=(adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(batch.response_mask).detach(),
        old_logprobs=old,
        hidden=hidden,
        lm_head=full_tensor(lm_head_weight(ctx.policy).detach()) if ctx.selector.needs_hidden else None,
        lr=ctx.lr,
        all_reduce=ctx.sum_over_ranks,
        topk_ids=topk,
    )
    with torch.no_grad():
        selection = ctx.selector(view)
    return selection, batch.response_mask & selection.token_mask


def normalizer(ctx: StepContext, batch: RolloutBatch, mask: Tensor) -> Normalizer:
    """Global counts of ``mask`` summed over ranks (gradients then match any data split)."""
    return Normalizer.from_mask(
        mask, max_len=constant_len(ctx.objective, batch), all_reduce=ctx.sum_over_ranks, world_size=ctx.world_size
    )


def denominator(ctx: StepContext, norm: Normalizer) -> Tensor:
    """The loss denominator of the objective's aggregation, as a metric."""
    return torch.tensor(norm.denominator(ctx.objective.aggregation), dtype=torch.float32)


def constant_len(objective: Objective, batch: RolloutBatch) -> int:
    """Dr.GRPO's constant L: the objective's ``max_len``, else the batch's token budget, else its padded length."""
    if objective.max_len is not None:
        return int(objective.max_len)
    if batch.max_new_tokens is not None:
        return int(batch.max_new_tokens)
    return int(batch.response_mask.shape[1])


def reference_logprobs(reference: nn.Module, batch: RolloutBatch, micro_batch_size: int | None = None) -> Tensor:
    """[N, L] logprobs of the frozen reference model (moved to the batch's device on first use), in forwards
    of at most ``micro_batch_size`` rows (None: one forward), so its activations are bounded like the policy's."""
    device = batch.input_ids.device
    if next(reference.parameters()).device != device:
        reference.to(device)
    rows, length = batch.num_completions, batch.response_mask.shape[1]
    size = micro_batch_size or rows
    with torch.no_grad():
        parts = [
            score_responses(reference, batch.input_ids[i : i + size], batch.attention_mask[i : i + size], length)
            for i in range(0, rows, size)
        ]
    return torch.cat([part.logprobs for part in parts])


def tis_weights(ctx: StepContext, old: Tensor, behavior: Tensor) -> Tensor | None:
    """Truncated importance weights min(pi_old / pi_engine, tis_cap), or None when TIS is off."""
    if ctx.tis_cap is None:
        return None
    return truncated_importance_weight(old, behavior, ctx.tis_cap)


def backward_and_step(ctx: StepContext, loss: Tensor | None, metrics: dict, weight: float = 1.0) -> None:
    """Backward (if ``loss`` given), clip, and step, unless the loss or gradient is not finite."""
    if loss is not None:
        if ctx.guard.any_rank_non_finite(loss, ctx.sum_over_ranks):
            ctx.guard.skip(ctx.optimizer, ctx.scheduler, "loss", ctx.rollout_step)
            return
        ctx.backward(loss)
    params = [p for p in ctx.policy.parameters() if p.grad is not None]
    max_norm = ctx.max_grad_norm if ctx.max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros((), dtype=torch.float32)
    grad_norm = full_tensor(grad_norm)  # FSDP2: a replicated DTensor
    if not torch.isfinite(grad_norm):
        ctx.guard.skip(ctx.optimizer, ctx.scheduler, "gradient", ctx.rollout_step)
        return
    accumulate(metrics, {"objective/grad_norm": grad_norm.detach()}, weight)
    metrics["train/lr"] = torch.tensor(ctx.lr, dtype=torch.float32)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.guard.stepped()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
