"""Token rejection rates of the selector, counted over every rank (the paper's ``curvature_clip_ratio_*``)."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from capo_lightning.callbacks.ranks import sum_over_ranks
from capo_lightning.selection import Selection

THRESHOLD_KEYS = ("select/delta_f", "select/tau_h", "select/calibrating")  # logged as the selector reports them
COUNTS = (
    "judged",
    "rejected",
    "rejected_fisher",
    "rejected_hessian",
    "judged_pos_adv",
    "rejected_pos_adv",
    "judged_neg_adv",
    "rejected_neg_adv",
)  # fmt: skip  (order of the summed count vector)


def rejected_tokens(selection: Selection) -> Tensor:
    """[N, L] bool: the judged tokens that failed any test of the selector.

    With tests reported (CAPO) a token is rejected when it fails the Fisher OR the Hessian test, also
    when the selector only measures (``enforce=False``: what it would have rejected); a selector that
    reports no tests rejects what its mask drops.
    """
    judged = selection.judged
    if selection.failed:
        failed = torch.stack(list(selection.failed.values())).any(dim=0)
        return judged & failed
    return judged & ~selection.token_mask


def rejection_counts(
    trainer: Trainer, selection: Selection, advantages: Tensor | None = None
) -> dict[str, float] | None:
    """Judged and rejected token counts of the step summed over all ranks; None when no selector ran.

    With ``advantages`` ([N] per completion, or [N, L] per token) the counts are also split by the sign of
    each token's advantage (zero-advantage tokens count in neither split).
    """
    if selection.judged is None:
        return None
    judged, failed, rejected = selection.judged, selection.failed, rejected_tokens(selection)
    none = torch.zeros((), dtype=torch.long, device=judged.device)
    counts = [
        judged.sum(),
        rejected.sum(),
        (judged & failed["fisher"]).sum() if "fisher" in failed else none,
        (judged & failed["hessian"]).sum() if "hessian" in failed else none,
    ]
    if advantages is not None:
        adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(judged)
        positive, negative = adv > 0, adv < 0
        counts += [(judged & positive).sum(), (rejected & positive).sum()]
        counts += [(judged & negative).sum(), (rejected & negative).sum()]
    else:
        counts += [none] * 4
    total = sum_over_ranks(trainer, torch.stack(counts)).tolist()  # int64: exact counts
    return {key: float(value) for key, value in zip(COUNTS, total)}


class RejectionMonitor(Callback):
    """Logs ``select/*``: the share of judged response tokens the selector rejected, per step and cumulative.

    Rates are rejected tokens over judged tokens, both summed over all ranks before dividing (the paper's
    definition; a mean of per-rank fractions would weigh a rank with few tokens as much as one with many):

    * ``select/token_reject_rate``: rejected by the Fisher OR the Hessian test (Fig. 5's rejection rate);
    * ``select/reject_rate_fisher``, ``select/reject_rate_hessian``: each test alone;
    * ``select/tokens_judged``, ``select/tokens_rejected``: the step's counts;
    * ``select/reject_rate_pos_adv``, ``select/reject_rate_neg_adv``: the rate among tokens of positive /
      negative advantage, and ``select/rejected_pos_adv_share``: the share of rejected tokens whose advantage
      is positive (does the selector drop what the update would reinforce, or what it would suppress?);
    * ``select/token_reject_rate_cum`` (and the ``_fisher``/``_hessian`` splits): over the run so far;
    * ``select/delta_f``, ``select/tau_h``, ``select/calibrating``: the thresholds in force and whether a
      calibration warm-up is measuring them (CAPO; NaN thresholds during the warm-up).

    Cumulative counts are kept in the checkpoint, so a resumed run continues them. Nothing is logged in a
    run without a selector. Reads the ``selection`` that ``training_step`` returns.

    Args:
        prog_bar: show the step's rejection rate in the progress bar.
    """

    def __init__(self, prog_bar: bool = True) -> None:
        self.prog_bar = prog_bar
        self.totals = dict.fromkeys(COUNTS, 0.0)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count this step's rejections over all ranks and log the rates."""
        selection = outputs.get("selection") if isinstance(outputs, dict) else None
        advantages = outputs.get("advantages") if isinstance(outputs, dict) else None
        counts = rejection_counts(trainer, selection, advantages) if selection is not None else None
        if counts is None:
            return
        for key, value in counts.items():
            self.totals[key] += value
        metrics = {**_rates(counts, ""), **_rates(self.totals, "_cum")}
        metrics["select/reject_rate_pos_adv"] = counts["rejected_pos_adv"] / max(counts["judged_pos_adv"], 1.0)
        metrics["select/reject_rate_neg_adv"] = counts["rejected_neg_adv"] / max(counts["judged_neg_adv"], 1.0)
        metrics["select/rejected_pos_adv_share"] = counts["rejected_pos_adv"] / max(counts["rejected"], 1.0)
        metrics["select/tokens_judged"] = counts["judged"]
        metrics["select/tokens_rejected"] = counts["rejected"]
        for key in THRESHOLD_KEYS:  # the thresholds in force (the same on every rank); NaN while calibrating
            if key in selection.metrics:
                metrics[key] = float(selection.metrics[key])
        for key, value in metrics.items():
            pl_module.log(key, float(value), on_step=True, on_epoch=False, batch_size=1)
        if self.prog_bar:
            pl_module.log("rej", metrics["select/token_reject_rate"], prog_bar=True, logger=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """The run's cumulative counts."""
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the cumulative counts of a resumed run."""
        self.totals.update(state_dict.get("totals", {}))


def _rates(counts: dict[str, float], suffix: str) -> dict[str, float]:
    judged = max(counts["judged"], 1.0)
    return {
        f"select/token_reject_rate{suffix}": counts["rejected"] / judged,
        f"select/reject_rate_fisher{suffix}": counts["rejected_fisher"] / judged,
        f"select/reject_rate_hessian{suffix}": counts["rejected_hessian"] / judged,
    }
