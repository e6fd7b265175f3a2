"""Predicted policy and objective shifts (m_F, m_H) of every step, over all ranks, as CAPO measures
them."""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from capo_lightning import keys
from capo_lightning.callbacks.ranks import gather_over_ranks
from capo_lightning.selection.stats import shift_stats
from capo_lightning.training.result import step_result


class CurvatureMonitor(Callback):
    """Logs ``curvature/*``: a selector's shifts (``Selection.shifts``), before and after its mask.

    Whatever the selector names them: an [N, L] entry ``<name>`` is a per-token shift and gives
    ``curvature/<name>_{mean,max,p50,p95}`` and ``curvature/masked_<name>_*``; a scalar entry is a
    step-level shift, logged as ``curvature/<name>``. For CAPO:

    * ``curvature/token_{fisher,hessian}_{mean,max,p50,p95}``: over every judged response token of
      the step, gathered from all ranks (percentiles of the whole step, not means of per-rank
      percentiles);
    * ``curvature/masked_token_*``: the same over the tokens the mask kept (NaN when it kept none: a
      0 would read as "tiny shifts", and a key left out would repeat the previous step's value);
    * ``curvature/global_{fisher,hessian}`` and ``curvature/masked_global_*``: the step's batch
      ("global") shifts with the direction built from every token / from the kept tokens (already
      computed over all ranks by the selector).

    These are the paper's Fig. 3 quantities: baselines plot the unmasked keys (with a measuring
    selector, ``enforce: false``), CAPO the ``masked_`` ones. Every ``histogram_every_n_steps``
    steps the token values also go to the loggers that take histograms (W&B, TensorBoard); the CSV
    logger takes none. Nothing is logged when the selector reports no shifts (no selector, KeepAll).

    Args:
        histogram_every_n_steps: steps between histograms; 0 = never.
    """

    def __init__(self, histogram_every_n_steps: int = 10) -> None:
        if histogram_every_n_steps < 0:
            raise ValueError(
                "CurvatureMonitor.histogram_every_n_steps must be >= 0, got "
                f"{histogram_every_n_steps}"
            )
        self.histogram_every_n_steps = histogram_every_n_steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Gather the step's token shifts from all ranks and log their statistics."""
        result = step_result(outputs)
        selection = result.selection if result is not None else None
        if selection is None or selection.judged is None or not selection.shifts:
            return
        # [N, L] shifts
        per_token = [name for name, value in selection.shifts.items() if value.dim() == 2]
        metrics: dict[str, float] = {}
        histograms: dict[str, Tensor] = {}
        for masked, tokens in (
            (False, selection.judged),
            (True, selection.judged & selection.token_mask),
        ):
            for name in per_token:
                values = gather_over_ranks(trainer, selection.shifts[name][tokens].float())
                key = keys.shift(name, masked=masked)
                stats = {
                    f"{key}_{stat}": math.nan for stat in keys.SHIFT_STATS
                }  # none kept: NaN, not a stale or 0 value
                stats.update({k: float(v) for k, v in shift_stats(key, values).items()})
                metrics.update(stats)
                histograms[key] = values
        for name, value in selection.shifts.items():
            if value.dim() == 0:  # a step-level shift (CAPO's batch shifts), already over all ranks
                metrics[keys.shift(name)] = float(value)
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)
        step = trainer.global_step
        if (
            self.histogram_every_n_steps
            and step % self.histogram_every_n_steps == 0
            and trainer.is_global_zero
        ):
            log_histograms(trainer, histograms, step)


def log_histograms(trainer: Trainer, histograms: dict[str, Tensor], step: int) -> None:
    """Send histograms to every logger that takes them (W&B, TensorBoard)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log(
                {
                    f"{k}_hist": wandb.Histogram(v.cpu().numpy())
                    for k, v in histograms.items()
                    if v.numel()
                }
                | {"trainer/global_step": step}
            )
        elif isinstance(logger, TensorBoardLogger):
            for key, values in histograms.items():
                if values.numel():
                    logger.experiment.add_histogram(f"{key}_hist", values.cpu(), step)
