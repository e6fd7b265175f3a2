"""CAPOModule: owns the policy (and a frozen reference when needed) and runs one RL step."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from capo_lightning.batch import RolloutBatch
from capo_lightning.evaluation import Evaluator
from capo_lightning.forward import ForwardOut, score_responses
from capo_lightning.objectives import GRPO, Normalizer, Objective
from capo_lightning.objectives.functional import masked_mean as _masked_mean
from capo_lightning.objectives.functional import truncated_importance_weight
from capo_lightning.optim import WarmupCosineLR, default_optimizer
from capo_lightning.policy import PolicySpec, lm_head_weight, load_policy
from capo_lightning.rollout import HFEngine, RolloutEngine
from capo_lightning.selection import Selection, Selector, TokenView
from capo_lightning.step_metrics import accumulate, rollout_metrics, sample_text
from capo_lightning.steps import StepPlan, plan_step


class CAPOModule(L.LightningModule):
    """Policy-gradient fine-tuning with pluggable Objective and Selector (manual optimization).

    One training step takes one rollout batch (see :mod:`capo_lightning.batch`) and runs
    ``ppo_epochs`` passes of ``minibatches`` optimizer steps over it. With both at 1 (the paper's
    setting) there is a single forward: the old logprobs are the detached logprobs of the training
    forward itself, so the ratio is exactly 1. Otherwise a no-grad pass first fixes the old
    logprobs. The selector's mask is applied before the normaliser, so rejected tokens leave both
    numerator and denominator.

    Args:
        policy: which model to train.
        objective: advantage estimator and loss (default GRPO).
        selector: token selector; None keeps every token (identical to KeepAll).
        engine: rollout engine (default HFEngine, which shares the policy).
        optimizer: builds the optimizer from the policy's trainable parameters.
        lr_scheduler: builds the lr schedule; stepped once per optimizer step.
        ppo_epochs: mu, passes over each rollout batch.
        minibatches: optimizer steps per pass; must divide N.
        micro_batch_size: rows per forward/backward (gradient accumulation); None = whole minibatch.
        max_grad_norm: clip the global gradient norm to this; None disables clipping (norm still logged).
        sample_every_n_steps: print one prompt/completion/reward every n steps (0 = never).
        max_consecutive_skips: stop the run after this many optimizer steps in a row with a
            non-finite loss or gradient (each such step is skipped, leaving the weights unchanged).
        mask_truncated: drop completions that hit max_new_tokens from the loss (DAPO's overlong filtering).
        tis_cap: multiply each token's loss by min(pi_old / pi_engine, tis_cap), the truncated importance
            weight that corrects for engine/trainer logprob mismatch (TIS); None disables it.
    """

    def __init__(
        self,
        policy: PolicySpec | None = None,
        objective: Objective | None = None,
        selector: Selector | None = None,
        engine: RolloutEngine | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        ppo_epochs: int = 1,
        minibatches: int = 1,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        sample_every_n_steps: int = 0,
        max_consecutive_skips: int = 20,
        mask_truncated: bool = False,
        tis_cap: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("ppo_epochs", ppo_epochs),
            ("minibatches", minibatches),
            ("micro_batch_size", micro_batch_size or 1),
        ):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        self.automatic_optimization = False
        self.policy_spec = policy if policy is not None else PolicySpec()
        self.objective = objective if objective is not None else GRPO()
        self.selector = selector
        self.engine = engine if engine is not None else HFEngine()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.ppo_epochs, self.minibatches, self.micro_batch_size = ppo_epochs, minibatches, micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.sample_every_n_steps = sample_every_n_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.mask_truncated = mask_truncated
        if tis_cap is not None and tis_cap <= 0:
            raise ValueError(f"model.tis_cap must be > 0 (typically 2), got {tis_cap}; None disables it")
        self.tis_cap = tis_cap
        self._consecutive_skips = 0
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._reference: torch.nn.Module | None = None  # plain attribute: not a child, not checkpointed
        self.rollout_step = 0
        self.completions_total = 0
        self.skipped_steps = 0
        self._last_step_end: float | None = None

    # ---- building -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load policy (+ reference), bind the engine and connect the DataModule. Idempotent."""
        if self.policy is None:
            self.policy, self.tokenizer = load_policy(self.policy_spec)
            if self.objective.needs_reference:
                reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
                object.__setattr__(self, "_reference", reference)  # not a child: kept out of state_dict, optimizer, DDP
            self.engine.bind(self.policy, self.tokenizer)
            if self.selector is not None and hasattr(self.selector, "build"):
                self.selector.build(*lm_head_weight(self.policy).shape)  # state exists before a restore
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            context = getattr(self.policy.config, "max_position_embeddings", None)
            datamodule.connect(self.engine, self.tokenizer, self._rollout_state, context_len=context)

    def _rollout_state(self) -> tuple[int, int]:
        return self.global_step, self.rollout_step

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference model (None when the objective has no KL term)."""
        return self._reference

    def configure_optimizers(self) -> Any:
        """Optimizer over the policy's trainable parameters only (never the reference)."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.set_total_steps(max(1, self.trainer.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Make sure the policy trains (from_pretrained returns eval mode) and warn on inert settings."""
        self.policy.train()
        if self.ppo_epochs == 1 and self.minibatches == 1 and self.objective.uses_clipping:
            rank_zero_warn(
                "capo: model.ppo_epochs = model.minibatches = 1, so the ratio is exactly 1 and the clip range "
                f"({type(self.objective).__name__} clip_low/clip_high) never acts; raise either to use it."
            )
        if self.tis_cap is not None and self.engine.shares_policy:
            rank_zero_warn(
                f"capo: model.tis_cap is set but {type(self.engine).__name__} samples with the policy itself, so "
                "engine and trainer logprobs agree and the importance weight is ~1; it matters with vLLM."
            )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """RolloutBatch knows how to move itself (texts stay on the host)."""
        if isinstance(batch, RolloutBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- the step -----------------------------------------------------------------------------
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> dict[str, Any]:
        """One rollout batch -> ``ppo_epochs * minibatches`` optimizer steps."""
        t0 = time.perf_counter()
        staleness = torch.tensor(float(self.global_step - batch.policy_version))
        if self.mask_truncated:
            batch = replace(batch, response_mask=batch.response_mask & ~batch.truncated.unsqueeze(1))
        advantages = self.objective.advantages(batch.rewards, batch.group_ids)  # [N]
        ref = self._reference_logprobs(batch)
        plan = plan_step(batch.num_completions, self.ppo_epochs, self.minibatches, self.micro_batch_size)
        metrics: dict[str, Tensor] = {}
        if plan.fused:
            selection = self._fused_step(batch, advantages, ref, metrics)
        else:
            selection = self._multi_step(batch, advantages, ref, plan, metrics)
        metrics.update(rollout_metrics(batch))
        metrics["rollout/staleness"] = staleness
        metrics.update({k: v for k, v in selection.metrics.items()})
        metrics["time/train_s"] = torch.tensor(time.perf_counter() - t0)
        self.rollout_step += 1
        self.completions_total += batch.num_completions * self.trainer.world_size
        metrics["train/completions_total"] = torch.tensor(float(self.completions_total))
        metrics["objective/skipped_steps"] = torch.tensor(float(self.skipped_steps))
        self._log_metrics(metrics, batch.num_completions)
        return {"selection": selection, "advantages": advantages.detach()}

    def _fused_step(self, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, metrics: dict) -> Selection:
        out = self._score(batch, need_hidden=self._needs_hidden())
        old = out.logprobs.detach()  # [N, L]
        selection, mask = self._select(batch, adv, old, out.hidden)
        norm = self._normalizer(mask)
        metrics["objective/normalizer"] = torch.tensor(norm.denominator(self.objective.aggregation))
        loss_out = self.objective(out.logprobs, old, ref, adv, mask, norm, self._tis(old, batch.behavior_logprobs))
        accumulate(metrics, loss_out.metrics, weight=1.0)
        accumulate(
            metrics,
            {"objective/loss": loss_out.loss.detach(), "objective/entropy": _masked_mean(out.entropy, mask)},
            1.0,
        )
        self._backward_and_step(loss_out.loss, metrics)
        metrics["rollout/engine_trainer_logprob_gap"] = _masked_mean(
            (old - batch.behavior_logprobs).abs(), batch.response_mask
        )
        return selection

    def _multi_step(
        self, batch: RolloutBatch, adv: Tensor, ref: Tensor | None, plan: StepPlan, metrics: dict
    ) -> Selection:
        with torch.no_grad():
            parts = [
                self._score(batch, rows, need_hidden=self._needs_hidden())
                for rows in plan.chunks(batch.num_completions)
            ]
        old = torch.cat([p.logprobs for p in parts])  # [N, L]
        hidden = torch.cat([p.hidden for p in parts]) if parts[0].hidden is not None else None
        selection, mask = self._select(batch, adv, old, hidden)
        metrics["rollout/engine_trainer_logprob_gap"] = _masked_mean(
            (old - batch.behavior_logprobs).abs(), batch.response_mask
        )
        num_updates = plan.ppo_epochs * len(plan.minibatch_rows(0))
        for epoch in range(plan.ppo_epochs):
            for mb_rows in plan.minibatch_rows(epoch):
                norm = self._normalizer(mask[mb_rows])
                accumulate(
                    metrics,
                    {"objective/normalizer": torch.tensor(norm.denominator(self.objective.aggregation))},
                    1.0 / num_updates,
                )
                total = torch.zeros((), device=old.device)
                for rows in plan.micro_rows(mb_rows):
                    out = self._score(batch, rows)
                    r_ref = ref[rows] if ref is not None else None
                    weights = self._tis(old[rows], batch.behavior_logprobs[rows])
                    loss_out = self.objective(out.logprobs, old[rows], r_ref, adv[rows], mask[rows], norm, weights)
                    self.manual_backward(loss_out.loss)
                    total = total + loss_out.loss.detach()
                    share = float(mask[rows].sum()) / max(float(mask.sum()), 1.0) / plan.ppo_epochs
                    accumulate(metrics, loss_out.metrics, share)
                    accumulate(metrics, {"objective/entropy": _masked_mean(out.entropy, mask[rows])}, share)
                accumulate(metrics, {"objective/loss": total}, 1.0 / num_updates)
                self._backward_and_step(None, metrics, weight=1.0 / num_updates)
        return selection

    def _score(self, batch: RolloutBatch, rows: Tensor | None = None, need_hidden: bool = False) -> ForwardOut:
        ids, attn = (
            (batch.input_ids, batch.attention_mask)
            if rows is None
            else (batch.input_ids[rows], batch.attention_mask[rows])
        )
        return score_responses(self.policy, ids, attn, batch.response_mask.shape[1], need_hidden=need_hidden)

    def _reference_logprobs(self, batch: RolloutBatch) -> Tensor | None:
        if not self.objective.needs_reference:
            return None
        device = batch.input_ids.device
        if next(self._reference.parameters()).device != device:
            self._reference.to(device)
        with torch.no_grad():
            return score_responses(
                self._reference, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
            ).logprobs

    def _tis(self, old: Tensor, behavior: Tensor) -> Tensor | None:
        if self.tis_cap is None:
            return None
        return truncated_importance_weight(old, behavior, self.tis_cap)

    def _needs_hidden(self) -> bool:
        return self.selector is not None and self.selector.needs_hidden

    def _select(self, batch: RolloutBatch, adv: Tensor, old: Tensor, hidden: Tensor | None) -> tuple[Selection, Tensor]:
        if self.selector is None:
            return Selection(token_mask=batch.response_mask), batch.response_mask
        view = TokenView(
            actions=batch.responses,
            response_mask=batch.response_mask,
            advantages=(adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(old).detach(),
            old_logprobs=old,
            hidden=hidden,
            lm_head=lm_head_weight(self.policy).detach() if self.selector.needs_hidden else None,
            lr=float(self.optimizers().param_groups[0]["lr"]),
            all_reduce=self._sum_over_ranks if self.trainer.world_size > 1 else None,
        )
        with torch.no_grad():
            selection = self.selector(view)
        return selection, batch.response_mask & selection.token_mask

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def _normalizer(self, mask: Tensor) -> Normalizer:
        """Global counts of ``mask`` summed over ranks (gradients then match any data split)."""
        world = self.trainer.world_size
        reduce = (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        return Normalizer.from_mask(mask, max_len=self._constant_len(mask), all_reduce=reduce, world_size=world)

    def _constant_len(self, mask: Tensor) -> int:
        """Dr.GRPO's constant L: the objective's max_len, else the rollout budget, else the padded length."""
        fixed = getattr(self.objective, "max_len", None)
        if fixed is not None:
            return int(fixed)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "sampling"):
            return int(datamodule.sampling.max_new_tokens)
        return int(mask.shape[1])

    def _backward_and_step(self, loss: Tensor | None, metrics: dict, weight: float = 1.0) -> None:
        """Backward (if ``loss`` given), clip, and step unless the loss or gradient is not finite."""
        opt = self.optimizers()
        if loss is not None:
            if self._any_rank_non_finite(loss):  # every rank must agree, or DDP's all-reduce would hang
                self._skip(opt, "loss")
                return
            self.manual_backward(loss)
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if not torch.isfinite(grad_norm):
            self._skip(opt, "gradient")
            return
        accumulate(metrics, {"objective/grad_norm": grad_norm.detach()}, weight)
        metrics["train/lr"] = torch.tensor(float(opt.param_groups[0]["lr"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._consecutive_skips = 0
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _any_rank_non_finite(self, loss: Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        return bool(bad > 0)

    def _skip(self, opt: Any, what: str) -> None:
        """Drop the gradient and take an empty optimizer step: weights and Adam moments stay as they
        were, but the step counts towards max_steps and the schedule, so a run cannot stall."""
        opt.zero_grad(set_to_none=True)
        opt.step()  # every grad is None: torch optimizers leave such parameters untouched
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.skipped_steps += 1
        self._consecutive_skips += 1
        rank_zero_warn(
            f"capo: non-finite {what} at rollout step {self.rollout_step}; update skipped, weights unchanged"
        )
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self._consecutive_skips} consecutive optimizer steps had a non-finite {what}; stopping. "
                "The last checkpoint holds the last finite weights; lower the learning rate "
                "(model.optimizer.init_args.lr) or raise model.max_consecutive_skips"
            )

    # ---- metrics ------------------------------------------------------------------------------
    def _log_metrics(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:
            metrics["time/step_s"] = torch.tensor(now - self._last_step_end)
        self._last_step_end = now
        sync = self.trainer.world_size > 1
        self.log_dict(
            {k: v.float() for k, v in metrics.items()},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
            sync_dist=sync,
        )
        self.log("reward", metrics["train/reward_mean"].float(), prog_bar=True, logger=False, batch_size=batch_size)

    def on_train_batch_end(self, outputs: Any, batch: RolloutBatch, batch_idx: int) -> None:
        """Push the new weights to the engine (a no-op for engines that share the policy)."""
        self.engine.sync_weights(self.policy, self.global_step)
        if self.sample_every_n_steps and batch.texts is not None and self.rollout_step % self.sample_every_n_steps == 0:
            rank_zero_info(sample_text(batch, self.rollout_step))

    def on_validation_epoch_start(self) -> None:
        self._evaluator = self._make_evaluator("val")

    def on_test_epoch_start(self) -> None:
        self._evaluator = self._make_evaluator("test")

    def validation_step(self, batch: RolloutBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Grade the sampled completions: accuracy, pass@k and maj@n per dataset (see :mod:`evaluation`)."""
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: RolloutBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Same as validation, logged under ``test/``."""
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval()

    def on_test_epoch_end(self) -> None:
        self._end_eval()

    def _end_eval(self) -> None:
        results = self._evaluator.compute()  # torchmetrics already synchronised the ranks
        self.log_dict(results)
        rank_zero_info(self._evaluator.summary(results, self.global_step))

    def _make_evaluator(self, stage: str) -> Evaluator:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = datamodule.eval_names(stage) if hasattr(datamodule, "eval_names") else []
        n = int(getattr(datamodule, "val_samples", 1))
        return Evaluator(stage, names, n, self.device)

    def _eval_step(self, batch: RolloutBatch, dataloader_idx: int) -> None:
        self._evaluator.update(batch, dataloader_idx)
        self.log_dict(
            self._evaluator.batch_metrics(batch, dataloader_idx),
            batch_size=batch.num_completions,
            sync_dist=self.trainer.world_size > 1,
            on_epoch=True,
            on_step=False,
            add_dataloader_idx=False,
        )

    # ---- checkpoint -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the data position and counters next to the weights."""
        checkpoint["capo_state"] = {
            "rollout_step": self.rollout_step,
            "completions_total": self.completions_total,
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the data position, so the next batch is the one the interrupted run would have seen."""
        state = checkpoint.get("capo_state", {})
        self.rollout_step = int(state.get("rollout_step", 0))
        self.completions_total = int(state.get("completions_total", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
