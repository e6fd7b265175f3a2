"""CAPOModule: owns the policy (and a frozen reference when needed) and wires one RL step together.

The step itself (forward, selection, loss, optimizer steps) lives in :mod:`capo_lightning.training`;
this file holds the Lightning hooks around it: building, bookkeeping, logging, weight sync,
evaluation, checkpoint state.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.data.eval_sets import EvalSpec
from capo_lightning.evaluation.hooks import EvaluationHooks
from capo_lightning.faults import inject
from capo_lightning.models.lora import check_lora, drop_frozen, is_lora
from capo_lightning.models.policy import PolicySpec, lm_head_weight
from capo_lightning.objectives import GRPO, Objective
from capo_lightning.rollout import HFEngine, RolloutEngine
from capo_lightning.scale.loading import build_models
from capo_lightning.scale.parallel import no_sync_for
from capo_lightning.selection import Selector, keep_out_of_ddp_broadcasts
from capo_lightning.training import schedules
from capo_lightning.training.context import NonFiniteGuard, StepContext
from capo_lightning.training.optim import default_optimizer, optimizer_config
from capo_lightning.training.passes import reference_logprobs
from capo_lightning.training.plan import inert_settings, plan_step
from capo_lightning.training.result import STEP_KEY, SelectionStats, StepResult
from capo_lightning.training.step_metrics import StepClock, rollout_metrics, sample_text


class CAPOModule(EvaluationHooks, LightningModule):
    """Policy-gradient fine-tuning with pluggable Objective and Selector (manual optimization).

    One training step takes one rollout batch (see :mod:`capo_lightning.batch`) and runs
    ``ppo_epochs`` passes of ``minibatches`` optimizer steps over it; with both at 1 (the paper's
    setting) the training forward is the only forward (:mod:`capo_lightning.training.schedules`).

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
        max_grad_norm: clip the global gradient norm to this; None disables clipping (norm still
            logged).
        sample_every_n_steps: print one prompt/completion/reward every n steps (0 = never).
        max_consecutive_skips: stop the run after this many optimizer steps in a row with a
            non-finite loss or gradient (each such step is skipped, leaving the weights unchanged).
        mask_truncated: drop completions that hit max_new_tokens from the loss (DAPO's overlong
            filtering).
        tis_cap: multiply each token's loss by min(pi_old / pi_engine, tis_cap), the truncated
            importance weight that corrects for engine/trainer logprob mismatch (TIS); None disables
            it.
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
        counts = {
            "ppo_epochs": ppo_epochs,
            "minibatches": minibatches,
            "micro_batch_size": micro_batch_size or 1,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        self.automatic_optimization = False
        self.policy_spec = policy if policy is not None else PolicySpec()
        self.objective = objective if objective is not None else GRPO()
        self.selector = selector
        self.engine = engine if engine is not None else HFEngine()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.ppo_epochs, self.minibatches, self.micro_batch_size = (
            ppo_epochs,
            minibatches,
            micro_batch_size,
        )
        self.max_grad_norm, self.sample_every_n_steps = max_grad_norm, sample_every_n_steps
        self.guard = NonFiniteGuard(max_consecutive_skips)
        self.mask_truncated = mask_truncated
        if tis_cap is not None and tis_cap <= 0:
            raise ValueError(
                f"model.tis_cap must be > 0 (typically 2), got {tis_cap}; None disables it"
            )
        self.tis_cap = tis_cap
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        # plain attribute: not a child, not checkpointed
        self._reference: torch.nn.Module | None = None
        # batches trained on; completions over all ranks
        self.rollout_step, self.completions_total = 0, 0
        self.eval_spec = EvalSpec()  # replaced by what the DataModule's connect() returns
        self._clock = StepClock()  # time/step_s without the validations (time/val_s)

    # ---- building -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load policy (+ reference), bind the engine and connect the DataModule. Idempotent."""
        if self.policy is None:
            self.policy, self.tokenizer, reference = build_models(
                self.policy_spec, self._trainer, self.objective.needs_reference
            )
            # not a child: kept out of state_dict, optimizer, DDP; a LoRA policy is its own
            object.__setattr__(self, "_reference", reference)
            check_lora(self.policy, self.selector)
            # a LoRA checkpoint holds no frozen base weights
            self.strict_loading = not is_lora(self.policy)
            self.engine.bind(self.policy, self.tokenizer)
            if self.selector is not None:
                # state exists before a restore
                self.selector.build(*lm_head_weight(self.policy).shape)
                # the same on every rank; 2 x 2.2 GB at 7B
                keep_out_of_ddp_broadcasts(self, "selector")
        if isinstance(datamodule := self._trainer and self._trainer.datamodule, RolloutDataModule):
            context = getattr(self.policy.config, "max_position_embeddings", None)
            self.eval_spec = datamodule.connect(self.engine, self.tokenizer, context_len=context)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient over the run (checkpointed)."""
        return self.guard.skipped_steps

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference model (None when the objective has no KL term)."""
        return self._reference

    def configure_optimizers(self) -> Any:
        """Optimizer over the policy's trainable parameters only (never the reference)."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return optimizer_config(
            params, self.optimizer_factory, self.scheduler_factory, lambda: self.trainer.max_steps
        )

    def on_fit_start(self) -> None:
        """Make sure the policy trains (from_pretrained returns eval mode) and warn on inert
        settings."""
        self.policy.train()
        for warning in inert_settings(
            self.ppo_epochs, self.minibatches, self.objective, self.tis_cap, self.engine
        ):
            rank_zero_warn(warning)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """RolloutBatch knows how to move itself (texts stay on the host)."""
        if isinstance(batch, RolloutBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> dict[str, StepResult]:
        """One rollout batch -> ``ppo_epochs * minibatches`` optimizer steps under the schedule
        :func:`~capo_lightning.training.schedules.choose` names; the :class:`StepResult` rides under
        ``STEP_KEY`` (Lightning's manual optimisation takes a Mapping), for the callbacks."""
        t0 = time.perf_counter()
        staleness = torch.tensor(
            float(self.global_step - batch.policy_version), dtype=torch.float32
        )
        if self.mask_truncated:
            batch = batch.replace(response_mask=batch.response_mask & ~batch.truncated.unsqueeze(1))
        advantages = self.objective.advantages(batch.rewards, batch.group_ids)  # [N]
        ref = None
        if self.objective.needs_reference:  # bounded like the policy's forwards
            ref = reference_logprobs(self._reference, batch, self.micro_batch_size)
        plan = plan_step(
            batch.num_completions, self.ppo_epochs, self.minibatches, self.micro_batch_size
        )
        context = self._step_context()
        schedule = schedules.choose(plan, self.selector)
        update = schedules.run(schedule, context, batch, advantages, ref, plan)
        metrics = {**update.metrics, **rollout_metrics(batch), keys.STALENESS: staleness}
        metrics[keys.TIME_TRAIN] = torch.tensor(time.perf_counter() - t0, dtype=torch.float32)
        self.rollout_step += 1
        self.completions_total += batch.num_completions * self.trainer.world_size
        metrics[keys.COMPLETIONS] = torch.tensor(float(self.completions_total), dtype=torch.float32)
        metrics[keys.SKIPPED_STEPS] = torch.tensor(float(self.skipped_steps), dtype=torch.float32)
        self._log_metrics(metrics, batch.num_completions)
        stats = SelectionStats.count(update.selection, advantages, context.sum_over_ranks)
        advantages = advantages.detach()
        return {
            STEP_KEY: StepResult(
                schedule.value, update.selection, advantages, update.loss, metrics, stats
            )
        }

    def _step_context(self) -> StepContext:
        return StepContext(
            policy=self.policy,
            objective=self.objective,
            selector=self.selector,
            guard=self.guard,
            manual_backward=self.manual_backward,
            optimizer=self.optimizers(),
            scheduler=self.lr_schedulers(),
            sum_over_ranks=self._sum_over_ranks if self.trainer.world_size > 1 else None,
            world_size=self.trainer.world_size,
            max_grad_norm=self.max_grad_norm,
            tis_cap=self.tis_cap,
            rollout_step=self.rollout_step,
            no_sync=no_sync_for(self.trainer.strategy, self.policy),  # one reduction per step
        )

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    # ---- metrics ------------------------------------------------------------------------------
    def _log_metrics(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        """The row's ``step`` = optimizer steps done (as ``max_steps`` and the progress bar count);
        ``time/step_s`` excludes validation (``time/val_s``). Selection and health are the
        callbacks' (:mod:`.callbacks`)."""
        seconds = self._clock.step_seconds()
        if seconds is not None:
            metrics[keys.TIME_STEP] = torch.tensor(seconds, dtype=torch.float32)
        values = {k: v.float() for k, v in metrics.items()}
        values["step"] = torch.tensor(float(self.global_step), dtype=torch.float32)
        self.log_dict(
            values,
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
            sync_dist=self.trainer.world_size > 1,
        )
        self.log(
            "reward",
            metrics[keys.REWARD_MEAN].float(),
            prog_bar=True,
            logger=False,
            batch_size=batch_size,
        )

    def on_train_batch_end(self, outputs: Any, batch: RolloutBatch, batch_idx: int) -> None:
        """Push the new weights to the engine (a no-op for engines that share the policy)."""
        inject("weight_sync")
        self.engine.sync_weights(self.policy, self.global_step)
        if (
            self.sample_every_n_steps
            and batch.texts is not None
            and self.rollout_step % self.sample_every_n_steps == 0
        ):
            rank_zero_info(sample_text(batch, self.global_step))

    # ---- checkpoint -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the counters and the policy's spec next to the weights (the data position is the
        DataModule's)."""
        inject("checkpoint_write")
        # LoRA: adapters (and a trained head) only
        drop_frozen(checkpoint["state_dict"], self.policy)
        checkpoint["capo_state"] = {
            "rollout_step": self.rollout_step,
            "completions_total": self.completions_total,
            "skipped_steps": self.skipped_steps,
            "policy": dataclasses.asdict(self.policy_spec),  # for `capo export`
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the counters; a checkpoint from before the DataModule kept the data position
        hands it ours."""
        state = checkpoint.get("capo_state", {})
        self.rollout_step = int(state.get("rollout_step", 0))
        self.completions_total = int(state.get("completions_total", 0))
        self.guard.skipped_steps = int(state.get("skipped_steps", 0))
        if isinstance(datamodule := self._trainer and self._trainer.datamodule, RolloutDataModule):
            datamodule.restore_legacy_position(checkpoint, trained_batches=self.rollout_step)
