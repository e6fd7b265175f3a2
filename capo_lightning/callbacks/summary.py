"""A few lines at the end of ``fit``: how the run went and where its outputs are."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from capo_lightning import keys

TRACKED = {keys.REWARD_MEAN: "reward", keys.VAL_ACCURACY: "held-out accuracy"}


class RunSummary(Callback):
    """Prints a summary of the run when ``fit`` ends (also after an early stop).

    The summary: the steps done, the first, last and best value of the training reward and of the
    held-out accuracy (with their steps), and where the metrics, checkpoints and figures are, with
    the ``capo report`` command that draws them.

    Args:
        report_dir: folder named for the figures; "" = ``<default_root_dir>/report``.
    """

    def __init__(self, report_dir: str = "") -> None:
        self.report_dir = report_dir
        self.history: dict[str, list[tuple[int, float]]] = {key: [] for key in TRACKED}
        self._start = time.perf_counter()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the step's reward."""
        self._record(trainer, keys.REWARD_MEAN)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the held-out accuracy (not during the sanity check)."""
        if not trainer.sanity_checking:
            self._record(trainer, keys.VAL_ACCURACY)

    def _record(self, trainer: Trainer, key: str) -> None:
        value = trainer.callback_metrics.get(key)
        if value is not None:
            self.history[key].append((trainer.global_step, float(value)))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the summary (rank zero)."""
        rank_zero_info(self.summary(trainer))

    def summary(self, trainer: Trainer) -> str:
        """The summary text."""
        minutes = (time.perf_counter() - self._start) / 60
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        lines = [f"capo: fit ended at step {trainer.global_step}{total} after {minutes:.1f} min"]
        for key, label in TRACKED.items():
            if self.history[key]:
                lines.append(f"  {label:<18} {describe(self.history[key])}   ({key})")
        lines += [f"  {name:<18} {where}" for name, where in self.places(trainer)]
        return "\n".join(lines)

    def places(self, trainer: Trainer) -> list[tuple[str, str]]:
        """(what, where) for the metrics, the checkpoints and the figures."""
        found = []
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir and (Path(log_dir) / "metrics.csv").exists():
                found.append(("metrics", str(Path(log_dir) / "metrics.csv")))
            elif isinstance(logger, WandbLogger):
                found.append(
                    ("W&B run", str(getattr(logger.experiment, "dir", "") or logger.save_dir))
                )
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            last = getattr(checkpoint, "last_model_path", "") or checkpoint.dirpath
            found.append(("checkpoints", str(last)))
        root = Path(trainer.default_root_dir)
        report = Path(self.report_dir) if self.report_dir else root / "report"
        made = " (made)" if (report / "summary.json").exists() else ""
        found.append(("figures", f"{report}{made}: capo report {root} --out {report}"))
        return found


def describe(points: list[tuple[int, float]]) -> str:
    """``first 0.06 (step 1) -> last 0.5 (step 12), best 0.75 (step 11)``."""
    (s0, v0), (s1, v1) = points[0], points[-1]
    sb, vb = max(points, key=lambda p: p[1])
    return f"first {v0:.3g} (step {s0}) -> last {v1:.3g} (step {s1}), best {vb:.3g} (step {sb})"
