"""Token rejection rates of the selector, counted over every rank (the paper's
``curvature_clip_ratio_*``)."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer

from capo_lightning import keys
from capo_lightning.training.result import step_result


class RejectionMonitor(Callback):
    """Logs ``select/*``: the share of judged tokens the selector rejected, per step and cumulative.

    Rates are rejected tokens over judged (response) tokens, both summed over all ranks before
    dividing (the paper's definition; a mean of per-rank fractions would weigh a rank with few
    tokens as much as one with many):

    * ``select/token_reject_rate``: rejected by any of the selector's tests (CAPO: the Fisher OR the
      Hessian test, Fig. 5's rejection rate), or dropped by its mask when it declares no tests;
    * ``select/reject_rate_<test>``: each test the selector declares (``Selection.failed``) alone,
      e.g. CAPO's ``select/reject_rate_fisher`` and ``select/reject_rate_hessian``; a selector logs
      only its own tests;
    * ``select/tokens_judged``, ``select/tokens_rejected``: the step's counts;
    * ``select/reject_rate_pos_adv``, ``select/reject_rate_neg_adv``: the rate among tokens of
      positive / negative advantage, and ``select/rejected_pos_adv_share``: the share of rejected
      tokens whose advantage is positive (does the selector drop what the update would reinforce, or
      what it would suppress?);
    * ``select/token_reject_rate_cum`` (and the per-test splits): over the run so far;
    * ``select/<setting>`` for each setting the selector reports (``Selection.settings``): CAPO's
      ``select/delta_f``, ``select/tau_h`` in force (NaN during a calibration warm-up) and
      ``select/calibrating``.

    Cumulative counts are kept in the checkpoint, so a resumed run continues them. Nothing is logged
    in a run without a selector. Reads the
    step's :class:`~capo_lightning.training.result.StepResult`: its counts (``stats``) are made once
    per step over all ranks and shared with the collapse detector.

    Args:
        prog_bar: show the step's rejection rate in the progress bar.
    """

    def __init__(self, prog_bar: bool = True) -> None:
        self.prog_bar = prog_bar
        self.totals: dict[str, float] = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the rates of this step's rejections, counted over all ranks once by the step
        (``StepResult.stats``)."""
        result = step_result(outputs)
        stats = result.stats if result is not None else None
        if stats is None:
            return
        counts = {
            "judged": stats.judged,
            "rejected": stats.rejected,
            **{f"rejected_{t}": n for t, n in stats.by_test.items()},
        }
        for key, value in counts.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        metrics = {
            **_rates(counts, stats.by_test, False),
            **_rates(self.totals, stats.by_test, True),
        }
        metrics[keys.REJECT_RATE_POS_ADV] = stats.rejected_pos / max(stats.judged_pos, 1.0)
        metrics[keys.REJECT_RATE_NEG_ADV] = stats.rejected_neg / max(stats.judged_neg, 1.0)
        metrics[keys.REJECTED_POS_ADV_SHARE] = stats.rejected_pos / max(stats.rejected, 1.0)
        metrics[keys.TOKENS_JUDGED] = stats.judged
        metrics[keys.TOKENS_REJECTED] = stats.rejected
        # e.g. CAPO's thresholds (the same on every rank)
        for name, value in result.selection.settings.items():
            metrics[keys.threshold(name)] = value
        for key, value in metrics.items():
            pl_module.log(key, float(value), on_step=True, on_epoch=False, batch_size=1)
        if self.prog_bar:
            pl_module.log(
                "rej", metrics[keys.TOKEN_REJECT_RATE], prog_bar=True, logger=False, batch_size=1
            )

    def state_dict(self) -> dict[str, Any]:
        """The run's cumulative counts."""
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the cumulative counts of a resumed run."""
        self.totals.update(state_dict.get("totals", {}))


def _rates(counts: dict[str, float], tests: dict[str, float], total: bool) -> dict[str, float]:
    """Rejected over judged tokens, overall and for each test the selector declares."""
    judged = max(counts["judged"], 1.0)
    out = {
        keys.cumulative(keys.TOKEN_REJECT_RATE) if total else keys.TOKEN_REJECT_RATE: counts[
            "rejected"
        ]
        / judged
    }
    out.update(
        {keys.reject_rate(t, total): counts.get(f"rejected_{t}", 0.0) / judged for t in tests}
    )
    return out
