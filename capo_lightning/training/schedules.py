"""The schedules of one training step: which forwards run, when the selector decides, when the
optimizer steps.

:func:`choose` names the schedule once per step from the plan and what the selector declares
(:class:`~capo_lightning.selection.Selector`'s ``needs_forward`` and ``streams``); :func:`run` runs
it.

=============  =====================================================================================
MASK_FIRST     the selector reads no forward (none, KeepAll): the mask is final before the first
               forward; one optimizer step over the micro-batches
ONE_FORWARD    one micro-batch holds the step: its training forward feeds the selector, then the
               loss
LOOK_AHEAD     several micro-batches and a selector that needs the whole step: a no-grad pass first
               computes only what it reads, then the training forwards with the final mask
STREAMING      several micro-batches and a streaming selector (CAPO): each micro-batch is judged
               inside its own training forward with a provisional normaliser (every response token);
               after the last, the selector closes the step, and the gradient is rescaled to the
               final normaliser (only a token-mean aggregation, DAPO, moves)
MULTI_PASS     ``ppo_epochs`` or ``minibatches`` > 1: a no-grad pass fixes the old logprobs and the
               mask, then ``ppo_epochs`` passes of ``minibatches`` optimizer steps, each accumulated
               over micro-batches
=============  =====================================================================================

In every schedule the selector's mask is applied before the normaliser, so rejected tokens leave
both the numerator and the denominator, and normalisers count the whole step on every rank; and
only the last backward before an optimizer step reduces the gradient over ranks (``last`` of
:meth:`~capo_lightning.training.context.StepContext.backward`): one reduction per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.objectives.functional import masked_mean
from capo_lightning.selection import Selector
from capo_lightning.training.context import StepContext
from capo_lightning.training.parts import (
    MicroBatches,
    Update,
    decide,
    denominator,
    judge,
    normalizer,
    optimizer_step,
    rescale_gradients,
    tis_weights,
)
from capo_lightning.training.passes import (
    forward_topk,
    needs_hidden,
    policy_forward,
    row_lengths,
    scoring_pass,
)
from capo_lightning.training.plan import StepPlan
from capo_lightning.training.step_metrics import accumulate


class Schedule(Enum):
    """The schedule of one step (module docstring)."""

    MASK_FIRST = "mask_first"
    ONE_FORWARD = "one_forward"
    LOOK_AHEAD = "look_ahead"
    STREAMING = "streaming"
    MULTI_PASS = "multi_pass"


def choose(plan: StepPlan, selector: Selector | None) -> Schedule:
    """The schedule of a step with ``plan`` under ``selector``."""
    if not plan.single_update:
        return Schedule.MULTI_PASS
    if selector is None or not selector.needs_forward:
        return Schedule.MASK_FIRST
    if plan.micro_batch_size >= plan.num_rows:
        return Schedule.ONE_FORWARD
    return Schedule.STREAMING if selector.streams else Schedule.LOOK_AHEAD


def run(
    schedule: Schedule,
    ctx: StepContext,
    batch: RolloutBatch,
    adv: Tensor,
    ref: Tensor | None,
    plan: StepPlan,
) -> Update:
    """Run ``schedule`` on one rollout batch."""
    return SCHEDULES[schedule](ctx, batch, adv, ref, plan)


def mask_first(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan
) -> Update:
    """The mask before any forward; one training forward per micro-batch (the whole batch when one
    holds it)."""
    chunks = plan.chunks(batch.num_completions, row_lengths(batch))
    selection, mask = decide(ctx, batch, adv, None)
    steps = MicroBatches(ctx, batch, adv, ref, normalizer(ctx, batch, mask))
    if len(chunks) == 1:
        steps.add(policy_forward(ctx, batch), None, mask)  # backpropagated by the optimizer step
        return steps.finish(selection, mask, None)
    for rows in chunks:
        loss = steps.add(policy_forward(ctx, batch, rows), rows, mask[rows])
        ctx.backward(loss, last=rows is chunks[-1])
    return steps.finish(selection, mask, chunks)


def one_forward(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan
) -> Update:
    """One forward of the whole batch feeds the selector and then the loss."""
    out = policy_forward(ctx, batch, need_hidden=needs_hidden(ctx), topk=forward_topk(ctx))
    selection, mask = decide(ctx, batch, adv, out)
    steps = MicroBatches(ctx, batch, adv, ref, normalizer(ctx, batch, mask))
    steps.add(out, None, mask)  # backpropagated by the optimizer step
    return steps.finish(selection, mask, None)


def look_ahead(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan
) -> Update:
    """A no-grad pass for the selector, then the training forwards with the final mask."""
    chunks = plan.chunks(batch.num_completions, row_lengths(batch))
    selection, mask = decide(ctx, batch, adv, scoring_pass(ctx, batch, chunks))
    steps = MicroBatches(ctx, batch, adv, ref, normalizer(ctx, batch, mask))
    for rows in chunks:
        loss = steps.add(policy_forward(ctx, batch, rows), rows, mask[rows])
        ctx.backward(loss, last=rows is chunks[-1])
    return steps.finish(selection, mask, chunks)


def streaming(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan
) -> Update:
    """Each micro-batch judged in its own forward; the step closed after the last; the gradient
    rescaled."""
    chunks = plan.chunks(batch.num_completions, row_lengths(batch))
    provisional = normalizer(ctx, batch, batch.response_mask)
    steps = MicroBatches(ctx, batch, adv, ref, provisional)
    try:
        for rows in chunks:
            out = policy_forward(
                ctx, batch, rows, need_hidden=needs_hidden(ctx), topk=forward_topk(ctx)
            )
            kept = batch.response_mask[rows] & judge(ctx, batch, adv, out, rows)
            ctx.backward(steps.add(out, rows, kept), last=rows is chunks[-1])
    except BaseException:
        ctx.selector.abandon()  # the judged parts of a failed step must not reach the next one
        raise
    selection = ctx.selector.close()
    mask = batch.response_mask & selection.token_mask
    steps.norm = normalizer(ctx, batch, mask)
    scale = denominator(ctx, provisional).item() / denominator(ctx, steps.norm).item()
    rescale_gradients(ctx, scale)
    return steps.finish(selection, mask, chunks, scale)


def multi_pass(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan
) -> Update:
    """A no-grad pass fixes old logprobs and the mask; then ``ppo_epochs`` x ``minibatches``
    optimizer steps."""
    lengths = row_lengths(batch)  # [N] on the host, read once: micro-batches group rows by it
    ahead = scoring_pass(ctx, batch, plan.chunks(batch.num_completions, lengths))
    selection, mask = decide(ctx, batch, adv, ahead)
    gap = masked_mean((ahead.logprobs - batch.behavior_logprobs).abs(), batch.response_mask)
    metrics = {keys.ENGINE_GAP: gap}
    for epoch in range(plan.ppo_epochs):
        for mb_rows in plan.minibatch_rows(epoch):
            for values, weight in _minibatch_update(
                ctx, batch, adv, ref, ahead.logprobs, mask, plan, mb_rows, lengths
            ):
                if weight is None:
                    metrics.update(values)
                else:
                    accumulate(metrics, values, weight)
    return Update(selection, metrics[keys.LOSS], metrics)


def _minibatch_update(
    ctx: StepContext,
    batch: RolloutBatch,
    adv: Tensor,
    ref: Tensor | None,
    old: Tensor,
    mask: Tensor,
    plan: StepPlan,
    mb_rows: Tensor,
    lengths: Tensor,
) -> list[tuple[dict[str, Tensor], float | None]]:
    """One optimizer step of a multi-pass step over minibatch ``mb_rows``; its metrics with their
    weight in the step's mean over updates (loss-side ones: their share of the kept tokens; None:
    the value is set, not added)."""
    norm = normalizer(ctx, batch, mask[mb_rows])
    per_update = 1.0 / (plan.ppo_epochs * plan.minibatches)
    parts: list[tuple[dict[str, Tensor], float | None]] = [
        ({keys.NORMALIZER: denominator(ctx, norm)}, per_update)
    ]
    total = torch.zeros((), device=old.device, dtype=torch.float32)
    micro = plan.micro_rows(mb_rows, lengths)
    for rows in micro:
        out = policy_forward(ctx, batch, rows)
        weights = tis_weights(ctx, old[rows], batch.behavior_logprobs[rows])
        r_ref = ref[rows] if ref is not None else None
        loss_out = ctx.objective(
            out.logprobs, old[rows], r_ref, adv[rows], mask[rows], norm, weights
        )
        ctx.backward(loss_out.loss, last=rows is micro[-1])  # the minibatch's step reduces once
        total = total + loss_out.loss.detach()
        share = float(mask[rows].sum()) / max(float(mask.sum()), 1.0) / plan.ppo_epochs
        parts += [
            (loss_out.metrics, share),
            ({keys.ENTROPY: masked_mean(out.entropy, mask[rows])}, share),
        ]
    parts.append(({keys.LOSS: total}, per_update))
    stepped = optimizer_step(ctx, None)
    lr = {key: stepped.pop(key) for key in (keys.LR,) if key in stepped}
    return [*parts, (stepped, per_update), (lr, None)]


SCHEDULES: dict[Schedule, Callable[..., Update]] = {
    Schedule.MASK_FIRST: mask_first,
    Schedule.ONE_FORWARD: one_forward,
    Schedule.LOOK_AHEAD: look_ahead,
    Schedule.STREAMING: streaming,
    Schedule.MULTI_PASS: multi_pass,
}
