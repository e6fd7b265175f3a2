"""Notice a collapsing run (reward falls, entropy or length crash, gradients spike) and warn, stop
or roll back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from capo_lightning import keys
from capo_lightning.callbacks.collapse_signals import METRICS, Reading, Signals, Streaks, Thresholds
from capo_lightning.training.result import step_result

ACTIONS = ("warn", "stop", "rollback")


class CollapseDetector(Callback):
    """Watches training health each step and acts when a signal holds ``patience`` steps in a row.

    Signals (each off with None): the smoothed reward falls below ``(1 - reward_drop)`` x its
    running peak (once the peak reached ``min_peak_reward``); the smoothed entropy falls below
    ``entropy_ratio`` x its warm-up mean, or rises above ``entropy_rise`` x it (the policy
    dissolving into noise: answers run to the token budget, reward goes to 0 and stays there, as
    CAPO did with uncalibrated thresholds in the regime study, docs/results.md); more than
    ``truncated_max`` of the completions hit the token budget; the mean response shrinks below
    ``min_length`` tokens; the gradient norm exceeds ``grad_spike`` x the median of the last
    ``grad_window`` steps; more than ``reject_max`` of the judged tokens are rejected (counted over
    all ranks); the smoothed KL to the reference exceeds ``kl_max``. Inputs are the logged step
    metrics (:data:`~capo_lightning.callbacks.collapse_signals.METRICS`), identical on every rank,
    so every rank takes the same decision.

    Actions: ``warn`` logs it; ``stop`` ends the run with a message naming the signal and the
    checkpoint to resume from; ``rollback`` reloads the last healthy snapshot (weights, selector
    state, optimizer moments), multiplies the learning rate (and the schedule's base) by
    ``lr_factor`` and goes on, at most ``max_rollbacks`` times, then stops. For ``stop`` and
    ``rollback`` a snapshot (``<checkpoint dir>/healthy-candidate.ckpt``) is written every
    ``snapshot_every_n_steps`` steps while no signal is over its threshold (never during a warm-up,
    when nothing is judged); it becomes the trusted ``healthy.ckpt`` only when the next one is due
    and no signal rose in between (a rising signal discards it), so the state rolled back to
    predates the first sign of trouble by at least ``snapshot_every_n_steps`` steps: the smoothed
    signals lag the damage. ``rollback`` needs a strategy whose full state dict loads back as is
    (single device, DDP). Every step logs ``collapse/<signal>`` (1 = over threshold) and
    ``collapse/alarm``; each decision is also a line of ``collapse.jsonl`` in the log folder.

    Args:
        action: "warn", "stop" or "rollback".
        warmup_steps: steps observed before any signal is judged.
        patience: consecutive steps a signal must hold before acting.
        ema: weight of the new value in the smoothed signals.
        lr_factor: learning-rate multiplier applied at each rollback.
        max_rollbacks: rollbacks before the run is stopped instead.
        snapshot_every_n_steps: steps between healthy snapshots (stop and rollback only); 0 = none.
        snapshot_dir: folder of the snapshots; "" = the checkpoint callback's folder.
        reward_drop, min_peak_reward, entropy_ratio, entropy_rise, truncated_max, min_length,
            grad_spike, grad_window, reject_max, kl_max: the thresholds above.
    """

    def __init__(
        self,
        action: str = "warn",
        warmup_steps: int = 5,
        patience: int = 2,
        ema: float = 0.3,
        lr_factor: float = 0.5,
        max_rollbacks: int = 3,
        snapshot_every_n_steps: int = 5,
        snapshot_dir: str = "",
        reward_drop: float | None = 0.5,
        min_peak_reward: float = 0.1,
        entropy_ratio: float | None = 0.1,
        entropy_rise: float | None = 1.5,
        truncated_max: float | None = 0.9,
        min_length: float | None = 1.5,
        grad_spike: float | None = 10.0,
        grad_window: int = 20,
        reject_max: float | None = 0.5,
        kl_max: float | None = 1.0,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"CollapseDetector.action must be one of {ACTIONS}, got {action!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"CollapseDetector needs 0 < lr_factor <= 1; got {lr_factor}")
        self.action, self.patience, self.lr_factor = action, patience, lr_factor
        self.max_rollbacks, self.snapshot_every_n_steps, self.snapshot_dir = (
            max_rollbacks,
            snapshot_every_n_steps,
            snapshot_dir,
        )
        thresholds = Thresholds(
            reward_drop=reward_drop,
            min_peak_reward=min_peak_reward,
            entropy_ratio=entropy_ratio,
            entropy_rise=entropy_rise,
            truncated_max=truncated_max,
            min_length=min_length,
            grad_spike=grad_spike,
            grad_window=grad_window,
            reject_max=reject_max,
            kl_max=kl_max,
        )
        self.signals = Signals(thresholds, warmup_steps, ema)
        self.streaks = Streaks(patience)
        self.rollbacks = 0
        # (path, step) of the last trusted healthy snapshot
        self.snapshot: tuple[str, int] | None = None
        # the newest snapshot, trusted once the next one is due
        self._candidate: tuple[str, int] | None = None
        self.decisions: list[dict[str, Any]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse ``rollback`` where a full state dict cannot simply be loaded back (sharded
        strategies)."""
        if self.action == "rollback" and not isinstance(
            trainer.strategy, (SingleDeviceStrategy, DDPStrategy)
        ):
            raise ValueError(
                "CollapseDetector(action='rollback') supports single-device and DDP runs, not "
                f"{type(trainer.strategy).__name__}; use action='stop' and resume from the "
                "checkpoint it names"
            )

    # ---- every step ---------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the signals, log them, and act on those that held for ``patience`` steps."""
        readings = self.signals.update(self._values(trainer, outputs))
        fired = {r.signal for r in readings}
        alarms = self.streaks.update(readings)
        for name in _SIGNALS:
            pl_module.log(
                keys.collapse(name),
                float(name in fired),
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
        pl_module.log(
            keys.COLLAPSE_ALARM, float(bool(alarms)), on_step=True, on_epoch=False, batch_size=1
        )
        if fired:
            self._drop_candidate()
        if alarms:
            self._act(trainer, pl_module, alarms)
        elif (
            not fired
            and self.action != "warn"
            and self.snapshot_every_n_steps
            and self.signals.judging
        ):
            if trainer.global_step % self.snapshot_every_n_steps == 0:
                self._save_snapshot(trainer)

    def _values(self, trainer: Trainer, outputs: Any) -> dict[str, float]:
        logged = trainer.callback_metrics
        values = {
            name: float(logged[key])
            for name, key in METRICS.items()
            if key in logged and name != "reject"
        }
        result = step_result(outputs)
        # counted over all ranks once, by the step
        if result is not None and result.stats is not None:
            values["reject"] = result.stats.reject_rate
        return values

    # ---- decisions ----------------------------------------------------------------------------
    def _act(self, trainer: Trainer, pl_module: LightningModule, alarms: list[Reading]) -> None:
        step = trainer.global_step
        what = "; ".join(f"{r.signal}: {r.message}" for r in alarms)
        head = f"capo: collapse detected at step {step} ({what}, for {self.patience} steps)"
        action = self.action
        if action == "rollback" and (self.snapshot is None or self.rollbacks >= self.max_rollbacks):
            action = "stop"
            head += (
                "; no healthy snapshot to roll back to"
                if self.snapshot is None
                else f"; {self.rollbacks} rollbacks done"
            )
        if action == "warn":
            rank_zero_warn(head)
        elif action == "stop":
            trainer.should_stop = True
            rank_zero_warn(
                f"{head}. Stopping (CollapseDetector action={self.action}). "
                f"{self._resume_hint(trainer)}"
            )
        else:
            self._rollback(trainer, pl_module)
            rank_zero_warn(
                f"{head}. Rolled back to {self.snapshot[0]} (step {self.snapshot[1]}); learning "
                f"rate x {self.lr_factor} (rollback {self.rollbacks} of at most "
                f"{self.max_rollbacks})."
            )
        self._record(trainer, step, action, alarms)

    def _resume_hint(self, trainer: Trainer) -> str:
        if self.snapshot is not None:
            path, step = self.snapshot
            return (
                f"The last healthy checkpoint is {path} (step {step}): resume with --ckpt_path "
                f"{path}"
            )
        latest = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        return (
            f"No healthy snapshot was kept (snapshot_every_n_steps={self.snapshot_every_n_steps}); "
            f"the newest checkpoint is {latest}, which may already be affected."
        )

    def _record(self, trainer: Trainer, step: int, action: str, alarms: list[Reading]) -> None:
        decision = {
            "step": step,
            "action": action,
            "signals": [
                {"signal": r.signal, "value": r.value, "threshold": r.threshold} for r in alarms
            ],
        }
        self.decisions.append(decision)
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if trainer.is_global_zero and log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            with (Path(log_dir) / "collapse.jsonl").open("a") as f:
                f.write(json.dumps(decision) + "\n")

    # ---- snapshots and rollback -----------------------------------------------------------------
    def _snapshot_path(self, trainer: Trainer, name: str) -> Path:
        folder = self.snapshot_dir or getattr(trainer.checkpoint_callback, "dirpath", None)
        return (Path(folder or Path(trainer.default_root_dir) / "checkpoints") / name).resolve()

    def _save_snapshot(self, trainer: Trainer) -> None:
        """Trust the previous candidate (no signal since it was written), then write a new
        candidate."""
        if self._candidate is not None:
            healthy = self._snapshot_path(trainer, "healthy.ckpt")
            if trainer.is_global_zero:
                Path(self._candidate[0]).replace(healthy)
            self.snapshot = (str(healthy), self._candidate[1])
        candidate = self._snapshot_path(trainer, "healthy-candidate.ckpt")
        trainer.save_checkpoint(candidate)
        trainer.strategy.barrier()
        self._candidate = (str(candidate), trainer.global_step)

    def _drop_candidate(self) -> None:
        """A signal is up: the newest snapshot may already be affected and is never trusted."""
        self._candidate = None

    def _rollback(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Healthy weights and optimizer state back, learning rate down, signals reset."""
        checkpoint = torch.load(self.snapshot[0], map_location="cpu", weights_only=False)
        # the file's own step (also after a resume)
        self.snapshot = (self.snapshot[0], int(checkpoint["global_step"]))
        pl_module.load_state_dict(checkpoint["state_dict"])
        for optimizer, state in zip(trainer.optimizers, checkpoint["optimizer_states"]):
            current = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(state)
            for group, lr in zip(optimizer.param_groups, current):
                group["lr"] = lr * self.lr_factor
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [
                    lr * self.lr_factor for lr in config.scheduler.base_lrs
                ]
        self.rollbacks += 1
        self.signals.reset()
        self.streaks.reset()
        rank_zero_info(f"capo: restored {self.snapshot[0]}")

    # ---- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rollbacks done, the snapshot and the decisions (the running statistics start afresh on
        resume)."""
        return {"rollbacks": self.rollbacks, "snapshot": self.snapshot, "decisions": self.decisions}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` kept."""
        self.rollbacks = state_dict.get("rollbacks", 0)
        snapshot = state_dict.get("snapshot")
        self.snapshot = tuple(snapshot) if snapshot else None
        self.decisions = list(state_dict.get("decisions", []))


_SIGNALS = (
    "reward_drop",
    "entropy_collapse",
    "entropy_rise",
    "length_cap",
    "length_floor",
    "grad_spike",
    "reject_spike",
    "kl",
)
