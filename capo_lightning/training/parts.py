"""The pieces every schedule of a step is built from: what the selector sees and decides, the loss
normaliser, one micro-batch's loss, and the optimizer step. Selection is entered only
through :func:`decide` (and, for a streaming selector, :func:`judge` and its ``close``), the
normaliser only through :func:`normalizer`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.faults import inject
from capo_lightning.models.forward import ForwardOut
from capo_lightning.models.policy import lm_head_weight
from capo_lightning.objectives import Normalizer, Objective
from capo_lightning.objectives.functional import masked_mean, truncated_importance_weight
from capo_lightning.scale.parallel import full_tensor
from capo_lightning.selection import Selection, TokenView
from capo_lightning.training.context import StepContext
from capo_lightning.training.passes import _rows, in_row_order
from capo_lightning.training.step_metrics import accumulate


@dataclass
class Update:
    """What a schedule produced: the selection, the loss as the optimizer saw it, and the
    metrics."""

    selection: Selection
    loss: Tensor
    metrics: dict[str, Tensor]


def decide(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, seen: ForwardOut | None
) -> tuple[Selection, Tensor]:
    """The selector's decision on the whole step and the loss mask (response mask AND selection),
    [N, L] bool.

    ``seen`` is the forward the selector reads (None for a selector that reads none)."""
    if ctx.selector is None:
        return Selection(token_mask=batch.response_mask), batch.response_mask
    view = token_view(ctx, batch, adv, seen)
    with torch.no_grad():
        selection = ctx.selector(view)
    return selection, batch.response_mask & selection.token_mask


def judge(
    ctx: StepContext, batch: RolloutBatch, adv: Tensor, out: ForwardOut, rows: Tensor
) -> Tensor:
    """A streaming selector's keep mask [n, L] for the micro-batch ``rows``, from its own training
    forward."""
    view = token_view(ctx, batch, adv, out, rows)
    with torch.no_grad():
        return ctx.selector.judge(view, rows)


def token_view(
    ctx: StepContext,
    batch: RolloutBatch,
    adv: Tensor,
    seen: ForwardOut | None,
    rows: Tensor | None = None,
) -> TokenView:
    """What the selector sees of the step's ``rows`` (None: all of them)."""
    response_mask = _rows(batch.response_mask, rows)
    adv = _rows(adv.unsqueeze(1) if adv.dim() == 1 else adv, rows)
    return TokenView(
        actions=_rows(batch.responses, rows),
        response_mask=response_mask,
        advantages=adv.expand_as(response_mask).detach(),
        old_logprobs=seen.logprobs.detach() if seen is not None else None,
        hidden=seen.hidden if seen is not None else None,
        lm_head=full_tensor(lm_head_weight(ctx.policy).detach())
        if ctx.selector.needs_hidden
        else None,
        lr=ctx.lr,
        all_reduce=ctx.sum_over_ranks,
        topk_ids=seen.topk_ids if seen is not None else None,
        base_lr=ctx.base_lr,
    )


def normalizer(ctx: StepContext, batch: RolloutBatch, mask: Tensor) -> Normalizer:
    """Global counts of ``mask`` summed over ranks (gradients then match any data split)."""
    return Normalizer.from_mask(
        mask,
        max_len=constant_len(ctx.objective, batch),
        all_reduce=ctx.sum_over_ranks,
        world_size=ctx.world_size,
    )


def denominator(ctx: StepContext, norm: Normalizer) -> Tensor:
    """The loss denominator of the objective's aggregation, as a metric."""
    return torch.tensor(norm.denominator(ctx.objective.aggregation), dtype=torch.float32)


def constant_len(objective: Objective, batch: RolloutBatch) -> int:
    """Dr.GRPO's constant L: the objective's ``max_len``, else the batch's token budget, else its
    padded length."""
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


@dataclass
class MicroBatches:
    """The micro-batches of one optimizer step: each one's loss (the schedule backpropagates it at
    once, the step's last backward reducing over ranks; or :func:`optimizer_step` does when one
    forward holds the step), kept mask, entropy and old logprobs."""

    ctx: StepContext
    batch: RolloutBatch
    adv: Tensor
    ref: Tensor | None
    norm: Normalizer
    done: list = field(default_factory=list)  # (loss output, kept mask, entropy) per micro-batch
    olds: list = field(default_factory=list)  # detached logprobs per micro-batch: the old policy's

    def add(self, out: ForwardOut, rows: Tensor | None, mask: Tensor) -> Tensor:
        """The objective on one micro-batch's forward ``out`` (rows ``rows``, None = all) with its
        kept ``mask``; returns the loss, not yet backpropagated."""
        old = out.logprobs.detach()
        self.olds.append(old)
        weights = tis_weights(self.ctx, old, _rows(self.batch.behavior_logprobs, rows))
        loss_out = self.ctx.objective(
            out.logprobs,
            old,
            _rows(self.ref, rows),
            _rows(self.adv, rows),
            mask,
            self.norm,
            weights,
        )
        self.done.append((loss_out, mask, out.entropy))
        return loss_out.loss

    def finish(
        self, selection: Selection, mask: Tensor, chunks: list[Tensor] | None, scale: float = 1.0
    ) -> Update:
        """The step's metrics (losses weighted by each micro-batch's share of the kept tokens), then
        the optimizer step (backward first when one forward holds the step, ``chunks`` None), then
        the engine/trainer gap."""
        ctx, norm = self.ctx, self.norm
        metrics = {keys.NORMALIZER: denominator(ctx, norm)}
        kept = max(float(mask.sum()), 1.0)
        for loss_out, r_mask, entropy in self.done:
            share = 1.0 if len(self.done) == 1 else float(r_mask.sum()) / kept
            accumulate(metrics, loss_out.metrics, share)
            accumulate(metrics, {keys.ENTROPY: masked_mean(entropy, r_mask)}, share)
            accumulate(metrics, {keys.LOSS: loss_out.loss.detach()}, scale)
        metrics.update(optimizer_step(ctx, self.done[0][0].loss if chunks is None else None))
        olds = self.olds[0] if chunks is None else in_row_order(self.olds, chunks)
        gap = (olds - self.batch.behavior_logprobs).abs()
        metrics[keys.ENGINE_GAP] = masked_mean(gap, self.batch.response_mask)
        return Update(selection, metrics[keys.LOSS], metrics)


def rescale_gradients(ctx: StepContext, scale: float) -> None:
    """Multiply every accumulated gradient by ``scale`` (the provisional over the true loss
    denominator)."""
    if scale != 1.0:
        for param in ctx.policy.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)


def optimizer_step(ctx: StepContext, loss: Tensor | None) -> dict[str, Tensor]:
    """Backward (if ``loss`` is given), clip, and step, unless the loss or gradient is not finite
    (then the step is skipped on every rank and no metric is returned); returns the gradient norm
    and the learning rate used."""
    if loss is not None:
        if ctx.guard.any_rank_non_finite(loss, ctx.sum_over_ranks):
            ctx.guard.skip(ctx.optimizer, ctx.scheduler, "loss", ctx.rollout_step)
            return {}
        ctx.backward(loss)
    params = [p for p in ctx.policy.parameters() if p.grad is not None]
    max_norm = ctx.max_grad_norm if ctx.max_grad_norm is not None else float("inf")
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        if params
        else torch.zeros((), dtype=torch.float32)
    )
    grad_norm = full_tensor(grad_norm)  # FSDP2: a replicated DTensor
    if not torch.isfinite(grad_norm):
        ctx.guard.skip(ctx.optimizer, ctx.scheduler, "gradient", ctx.rollout_step)
        return {}
    metrics = {
        keys.GRAD_NORM: grad_norm.detach().float(),
        keys.LR: torch.tensor(ctx.lr, dtype=torch.float32),
    }
    inject("optimizer_step")
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.guard.stepped()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    return metrics
