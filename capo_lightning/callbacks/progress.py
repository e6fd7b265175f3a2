"""A progress bar that counts optimizer steps up to ``max_steps`` and shows the run's health at a
glance."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

# progress-bar key -> label, in display order
SHOWN = {"reward": "reward", "acc": "acc", "rej": "rej"}


class CapoProgressBar(TQDMProgressBar):
    """``step 37/100 [..] reward=0.41, acc=0.62, rej=0.031``.

    The bar counts optimizer steps (``trainer.global_step``, what ``max_steps`` and the CSV's
    ``step`` count) from where a resumed run starts, instead of Lightning's epoch bar, whose rollout
    stream has no length and whose epoch count read ``Epoch 0/-2``. ``reward`` is the step's mean
    reward, ``acc`` the last held-out accuracy and ``rej`` the selector's rejection rate (shown once
    logged by the module, the validation and :class:`~capo_lightning.callbacks.RejectionMonitor`).

    Args:
        refresh_rate: redraw every this many steps.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Create the bar, set up for steps (a resumed run may never call
        ``on_train_epoch_start``)."""
        super().on_train_start(trainer, pl_module)
        self._count_steps(trainer)

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        """Keep counting steps across epochs (instead of Lightning's per-epoch restart)."""
        self._count_steps(trainer)

    def _count_steps(self, trainer: Trainer) -> None:
        """Total = ``max_steps`` (unknown when unset); start (and the rate's origin) = the current
        step."""
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("step")
        bar.refresh()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Move to the optimizer-step count and show the latest metrics (every ``refresh_rate``
        steps)."""
        if self._train_progress_bar is None or (batch_idx + 1) % max(1, self.refresh_rate):
            return
        self._show(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the last step (skipped by ``refresh_rate`` > 1), then close."""
        if self._train_progress_bar is not None:
            self._show(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def _show(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """reward, acc and rej when known, rounded; no version number."""
        logged = trainer.progress_bar_metrics
        return {label: _short(logged[key]) for key, label in SHOWN.items() if key in logged}


def _short(value: Any) -> str:
    value = float(value)
    return f"{value:.3g}" if abs(value) >= 0.001 or value == 0 else f"{value:.1e}"
