"""What runs on one rollout batch: forward, selection, normaliser, loss, backward and optimizer steps.

Two paths, chosen by :class:`~capo_lightning.training.plan.StepPlan`:

* **single update** (``ppo_epochs = minibatches = 1``; the paper's setting): one optimizer step, accumulated
  over micro-batches, and one forward per micro-batch. Each training forward's detached logprobs are the
  old logprobs (the ratio is exactly 1: no update happens in between), and its LM-head inputs and top-k
  ids feed the selector: when one micro-batch holds the step, before its loss is aggregated; with several,
  a streaming selector (CAPO: each token's decision needs only its own gradient and the selector's state)
  judges each micro-batch inside its own forward and closes the step after the last one. The loss
  normaliser is then provisional (every response token) and the gradient is rescaled once the kept count
  is known, which only a token-mean aggregation (DAPO) needs. A selector that reads no forward (KeepAll)
  decides before any forward; one that needs the whole step and does not stream gets a no-grad look-ahead
  pass computing only what it reads.
* **multi-pass**: a no-grad pass over every row first fixes the old logprobs and the selector's inputs,
  so the mask, and with it every normaliser, is final before any loss is computed; then ``ppo_epochs``
  passes of ``minibatches`` optimizer steps, each accumulated over micro-batches.

Either way the selector's mask is applied before the normaliser, so rejected tokens leave both the
numerator and the denominator, and normalisers count the whole step on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning.batch import RolloutBatch
from capo_lightning.objectives import Normalizer, Objective
from capo_lightning.objectives.functional import masked_mean, truncated_importance_weight
from capo_lightning.parallel import full_tensor
from capo_lightning.policy import lm_head_weight
from capo_lightning.selection import Selection, TokenView
from capo_lightning.training.context import StepContext
from capo_lightning.training.passes import (
    _rows,
    forward_topk,
    in_row_order,
    needs_forward,
    needs_hidden,
    policy_forward,
    row_lengths,
    scoring_pass,
)
from capo_lightning.training.plan import StepPlan
from capo_lightning.training.step_metrics import accumulate


def single_update_step(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan, metrics: dict
) -> Selection:
    """``ppo_epochs = minibatches = 1``: one optimizer step over micro-batches, one training forward each."""
    chunks = plan.chunks(batch.num_completions, row_lengths(batch))
    whole = len(chunks) == 1  # one micro-batch holds the step: its forward also feeds the selector
    stream = not whole and needs_forward(ctx) and ctx.selector.streams
    selection, mask = None, None
    if not needs_forward(ctx):
        selection, mask = select_tokens(ctx, batch, adv, None, None, None)
    elif not whole and not stream:  # the mask must be final before the first loss: look ahead without grad
        ahead = scoring_pass(ctx, batch, chunks)
        selection, mask = select_tokens(ctx, batch, adv, ahead.logprobs, ahead.hidden, ahead.topk_ids)
    norm = normalizer(ctx, batch, batch.response_mask if stream else mask) if mask is not None or stream else None
    olds, done = [], []  # done: (loss output, kept mask, entropy) of each micro-batch
    for rows in [None] if whole else chunks:
        feed = mask is None or stream  # this forward feeds the selector
        topk = forward_topk(ctx) if feed else 0
        out = policy_forward(ctx, batch, rows, need_hidden=feed and needs_hidden(ctx), topk=topk)
        old = out.logprobs.detach()
        olds.append(old)
        if stream:
            r_mask = _rows(batch.response_mask, rows) & judge(ctx, batch, adv, old, out, rows)
        else:
            if feed:  # one micro-batch holds the step
                selection, mask = select_tokens(ctx, batch, adv, old, out.hidden, out.topk_ids)
                norm = normalizer(ctx, batch, mask)
            r_mask = _rows(mask, rows)
        loss_out = ctx.objective(
            out.logprobs, old, _rows(ref, rows), _rows(adv, rows), r_mask, norm,
            tis_weights(ctx, old, _rows(batch.behavior_logprobs, rows)),
        )  # fmt: skip
        done.append((loss_out, r_mask, out.entropy))
        if not whole:
            ctx.backward(loss_out.loss)
    scale = 1.0
    if stream:  # the step closes: the final mask, the true normaliser, the gradient rescaled to it
        selection = ctx.selector.close()
        mask = batch.response_mask & selection.token_mask
        norm, provisional = normalizer(ctx, batch, mask), norm
        scale = denominator(ctx, provisional).item() / denominator(ctx, norm).item()
        rescale_gradients(ctx, scale)
    record_losses(ctx, metrics, done, mask, norm, scale)
    backward_and_step(ctx, done[0][0].loss if whole else None, metrics)
    metrics["rollout/engine_trainer_logprob_gap"] = masked_mean(
        (in_row_order(olds, chunks) - batch.behavior_logprobs).abs(), batch.response_mask
    )
    return selection


def judge(ctx: StepContext, batch: RolloutBatch, adv: Tensor, old: Tensor, out, rows: Tensor) -> Tensor:  # noqa: ANN001
    """A streaming selector's keep mask [n, L] for the micro-batch ``rows``, from its own training forward."""
    view = token_view(ctx, batch, adv, old, out.hidden, out.topk_ids, rows)
    with torch.no_grad():
        return ctx.selector.judge(view, rows)


def rescale_gradients(ctx: StepContext, scale: float) -> None:
    """Multiply every accumulated gradient by ``scale`` (the provisional over the true loss denominator)."""
    if scale != 1.0:
        for param in ctx.policy.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)


def record_losses(ctx: StepContext, metrics: dict, done: list, mask: Tensor, norm: Normalizer, scale: float) -> None:
    """The step's loss (the sum over micro-batches, rescaled), normaliser, entropy and objective metrics
    (weighted by each micro-batch's share of the kept tokens)."""
    metrics["objective/normalizer"] = denominator(ctx, norm)
    kept = max(float(mask.sum()), 1.0)
    for loss_out, r_mask, entropy in done:
        share = 1.0 if len(done) == 1 else float(r_mask.sum()) / kept
        accumulate(metrics, loss_out.metrics, share)
        accumulate(metrics, {"objective/entropy": masked_mean(entropy, r_mask)}, share)
        accumulate(metrics, {"objective/loss": loss_out.loss.detach()}, scale)


def multi_pass_step(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan, metrics: dict
) -> Selection:
    """A no-grad pass fixes old logprobs and the mask; then ``ppo_epochs`` x ``minibatches`` optimizer steps."""
    lengths = row_lengths(batch)  # [N] on the host, read once: micro-batches group rows by it
    ahead = scoring_pass(ctx, batch, plan.chunks(batch.num_completions, lengths))
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
            for rows in plan.micro_rows(mb_rows, lengths):
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


def select_tokens(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, old: Tensor | None, hidden: Tensor | None, topk: Tensor | None
) -> tuple[Selection, Tensor]:
    """The selector's decision and the final loss mask (response mask AND selection), [N, L] bool."""
    if ctx.selector is None:
        return Selection(token_mask=batch.response_mask), batch.response_mask
    view = token_view(ctx, batch, adv, old, hidden, topk)
    with torch.no_grad():
        selection = ctx.selector(view)
    return selection, batch.response_mask & selection.token_mask


def token_view(
    ctx: StepContext,
    batch: RolloutBatch,
    adv: Tensor,
    old: Tensor | None,
    hidden: Tensor | None,
    topk: Tensor | None,
    rows: Tensor | None = None,
) -> TokenView:
    """What the selector sees of the step's ``rows`` (None: all of them)."""
    response_mask = _rows(batch.response_mask, rows)
    adv = _rows(adv.unsqueeze(1) if adv.dim() == 1 else adv, rows)
    return TokenView(
        actions=_rows(batch.responses, rows),
        response_mask=response_mask,
        advantages=adv.expand_as(response_mask).detach(),
        old_logprobs=old,
        hidden=hidden,
        lm_head=full_tensor(lm_head_weight(ctx.policy).detach()) if ctx.selector.needs_hidden else None,
        lr=ctx.lr,
        all_reduce=ctx.sum_over_ranks,
        topk_ids=topk,
        base_lr=ctx.base_lr,
    )


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
