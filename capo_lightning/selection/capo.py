"""CAPOSelector: keep the tokens whose predicted policy and objective shifts are small."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from capo_lightning.selection import curvature, global_shifts
from capo_lightning.selection.base import Selection, TokenView
from capo_lightning.selection.capo_state import CAPOState
from capo_lightning.selection.capo_step import JudgedPart, StepInProgress, continuing
from capo_lightning.selection.rows import StepRows
from capo_lightning.selection.stats import shift_stats

__all__ = ["CAPOSelector", "shift_stats"]


class CAPOSelector(CAPOState):
    """Curvature-Aware Policy Optimization token selection (Melo, Abate & Gal, arXiv 2510.00819).

    For every valid response token, the last-layer model
    of :mod:`~capo_lightning.selection.curvature` predicts the policy shift m_F and the objective
    shift m_H of the update that token alone would cause, and the token is kept iff m_F < delta_F
    and -tau_H < m_H < tau_H (``symmetric``) or 0 <= m_H < tau_H. The mask only changes which tokens
    enter the loss, so it composes with any objective (CAPO = GRPO + this, Dr.CAPO, ReinCAPO, DAPO +
    CAPO).

    Choices, following the official code where the paper is ambiguous (capo-method.md section 8):
    m_H includes the first-order term; the window is symmetric; each token's candidate step is the
    shadow-Adam step as if its gradient were the whole batch gradient (not 1/N-scaled); the shadow
    Adam keeps m, v per vocabulary row and one step counter, falls back to the raw gradient while
    empty, and is advanced once per selection with the per-row mean gradient of the accepted tokens
    (all ranks). With ``enforce=False`` nothing is masked and the state is never advanced, so the
    logged shifts use raw-gradient directions, exactly like the paper's baseline curves (Fig. 3).
    Departure: everything runs in fp32 (the code used the model's bf16).

    With LoRA (``model.policy.lora``) the curvature model stays the LM head's: it predicts the shift
    of the head's own update, so the head must train (``train_head: true``, in place); with a frozen
    head no such update happens and the module refuses the combination rather than report shifts of
    an update never made.

    Also the code's behaviour, kept: a zero-advantage token has no gradient, but its shadow-Adam
    direction is the momentum beta_1 * m, so m_F can exceed delta_F and the token is rejected (m_H
    is 0). That changes nothing in a GRPO or Dr.GRPO loss (its whole completion has A = 0), slightly
    enlarges the other tokens' weight in a token-normalised (DAPO) loss, and counts in the rejection
    rate; ``select/reject_rate_{pos,neg}_adv`` leave those tokens out. The default thresholds are
    the paper's for lr 1.5e-5 on a 7B model; m_F grows with lr^2, so another model or step size
    needs its own (``scripts/calibrate_capo.py``; docs/results.md shows the paper's defaults
    rejecting every low-probability token of SmolLM2-135M at lr 6e-5).

    **Calibrated thresholds** (``calibration_steps > 0``): the first ``calibration_steps`` steps
    only measure (nothing is masked; the shadow Adam advances with every token), then delta_F and
    tau_H are set to the ``calibration_percentile`` of the measured token shifts evaluated at
    ``calibration_lr`` (default: the schedule's peak, the optimizer's configured lr) and stay fixed;
    ``delta_f`` and ``tau_h`` are then unused. The thresholds live in the checkpoint and are logged
    every step (``select/delta_f``, ``select/tau_h``, ``select/calibrating``). The scaling law, the
    traps of a warm-up and what is done about each:
    :mod:`~capo_lightning.selection.calibration`.

    Args:
        delta_f: policy-shift threshold delta_F (CAPO 1e-4, Dr.CAPO 1e-3, ReinCAPO 1e-5).
        tau_h: objective-shift threshold tau_H (CAPO 0.01, Dr.CAPO 5e-4, ReinCAPO 0.1).
        symmetric: keep -tau_H < m_H < tau_H; False keeps 0 <= m_H < tau_H.
        top_k: size of each token's softmax subspace (the paper: 50); >= V is the exact model.
        optimizer_model: "adam" (the shadow Adam) or "sgd" (direction = gradient).
        betas: shadow-Adam betas (HF defaults, as the paper's runs).
        eps: shadow-Adam epsilon.
        enforce: apply the mask; False only measures and reports.
        token_chunk: tokens per logits block; None sizes it from the vocabulary.
        calibration_steps: steps of the measuring warm-up that sets the thresholds; 0 uses delta_f
            and tau_h.
        calibration_percentile: the percentile (0, 100] of the warm-up's token shifts the thresholds
            take.
        calibration_lr: the learning rate the thresholds are evaluated at; None = the optimizer's
            configured (peak) lr.
        advance_when_monitoring: with ``enforce=False``, advance the shadow Adam with every token
            anyway, so the measured shifts use Adam directions (those an enforcing CAPO judges)
            instead of raw gradients (the official code's baselines, Fig. 3).
    """

    needs_forward = needs_hidden = True
    streams = True  # judge() micro-batch by micro-batch inside the training forwards, then close()

    def __init__(
        self,
        delta_f: float = 1e-4,
        tau_h: float = 0.01,
        symmetric: bool = True,
        top_k: int = 50,
        optimizer_model: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        enforce: bool = True,
        token_chunk: int | None = None,
        calibration_steps: int = 0,
        calibration_percentile: float = 95.0,
        calibration_lr: float | None = None,
        advance_when_monitoring: bool = False,
    ) -> None:
        super().__init__()
        if optimizer_model not in ("adam", "sgd"):
            raise ValueError(
                f"CAPOSelector optimizer_model must be 'adam' or 'sgd', got {optimizer_model!r}"
            )
        if delta_f <= 0 or tau_h <= 0 or top_k < 1:
            raise ValueError(
                f"CAPOSelector needs delta_f > 0, tau_h > 0, top_k >= 1; got {delta_f}, {tau_h}, "
                f"{top_k}"
            )
        self.delta_f, self.tau_h, self.symmetric, self.top_k = delta_f, tau_h, symmetric, top_k
        self.optimizer_model, self.betas, self.eps = optimizer_model, tuple(betas), eps
        self.enforce, self.token_chunk = enforce, token_chunk
        if (
            calibration_steps < 0
            or not 0 < calibration_percentile <= 100
            or (calibration_lr or 1) <= 0
        ):
            raise ValueError(
                "CAPOSelector needs calibration_steps >= 0 (0 = fixed thresholds), 0 < "
                "calibration_percentile <= 100 and calibration_lr > 0 or null; got "
                f"{calibration_steps}, {calibration_percentile}, {calibration_lr}"
            )
        self.calibration_steps, self.calibration_percentile = (
            calibration_steps,
            calibration_percentile,
        )
        self.calibration_lr, self.advance_when_monitoring = calibration_lr, advance_when_monitoring
        # the scoring forward's logits give the top-k rows (ids; values redone in fp32)
        self.forward_topk = top_k
        self._register_state()
        # the step being judged (see judge, close, abandon)
        self._step: StepInProgress | None = None

    # ---- the decision -------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, view: TokenView) -> Selection:
        """Mask [N, L], per-token and global shifts, and rejection metrics for one step: every row
        judged, then the step closed."""
        self.judge(
            view, torch.arange(view.response_mask.shape[0], device=view.response_mask.device)
        )
        return self.close()

    @torch.no_grad()
    def judge(self, view: TokenView, rows: Tensor) -> Tensor:
        """The token shifts and keep mask [n, L] of ``view``, rows ``rows`` of the step (a
        micro-batch, or all).

        A token's decision depends only on its own gradient and the shadow-Adam state, which changes
        only in :meth:`close`, so micro-batches can be judged one by one inside their training
        forwards; what needs the whole step (the batch shifts, the shadow-Adam advance) waits
        for :meth:`close`. The part joins the step's record only once judged, so a judge() that
        raises leaves the record as it was; a record left by an earlier step that failed
        without :meth:`abandon` is not joined (:func:`~.capo_step.continuing`).
        """
        valid = view.response_mask  # [n, L]
        lm_head = view.lm_head.float()
        self.build(*lm_head.shape)
        # None: a new step begins
        self._step = continuing(self._step, view.response_mask.shape[1], view.lr, rows)
        step = self._step if self._step is not None else self._start_step(view, lm_head.shape[0])
        hidden = view.hidden[valid].float()  # [T, d]
        adv = view.advantages[valid].float()  # [T]
        # [T, k] from the forward
        known = view.topk_ids[valid] if view.topk_ids is not None else None
        top = curvature.topk_policy(
            hidden, lm_head, view.actions[valid], self.top_k, self.token_chunk, known
        )
        shifts = curvature.token_shifts(top, hidden, adv, view.lr, step.direction)
        ok_f, ok_h = self._tests(shifts, step.thresholds)
        keep = ok_f & ok_h if self.enforce else torch.ones_like(ok_f)
        seq = rows.to(valid.device)[valid.nonzero()[:, 0]]  # [T] the step row of each token
        step.parts.append(JudgedPart(rows, valid, top, hidden, adv, seq, shifts, ok_f, ok_h, keep))
        self._step = step
        mask = torch.zeros_like(valid)
        mask[valid] = keep
        return mask | ~valid  # padding positions are the response mask's business, not ours

    @torch.no_grad()
    def close(self) -> Selection:
        """The step's batch shifts over every judged token (all ranks), the shadow-Adam advance, and
        the Selection."""
        # taken first: a close() that raises leaves no record behind
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError(
                "CAPOSelector.close() with no judged micro-batch: judge() each micro-batch first"
            )
        step.check_complete()
        flat = {k: step.tokens(k) for k in ("hidden", "adv", "seq", "ok_f", "ok_h", "keep")}
        shifts, keep = step.shifts(), flat["keep"]
        pre, post = global_shifts.batch_shifts(  # every token, the kept tokens
            step.top(),
            flat["hidden"],
            flat["adv"],
            flat["seq"],
            [torch.ones_like(keep), keep],
            step.lr,
            step.vocab,
            step.direction,
            step.all_reduce,
        )
        if self.optimizer_model == "adam" and (
            self.enforce or self.advance_when_monitoring or step.calibrating
        ):
            self._advance(post.rows[post.touched], post.row_gradients[post.touched])
        if step.calibrating:
            self._calibration_step(shifts, flat["adv"], step)
        steps = StepRows(step.parts)
        token_mask = steps.scatter(keep, fill=True)
        out_shifts = {
            "token_fisher": steps.scatter(shifts.fisher),
            "token_hessian": steps.scatter(shifts.hessian),
            "global_fisher": pre.fisher,
            "global_hessian": pre.hessian,
            "masked_global_fisher": post.fisher,
            "masked_global_hessian": post.hessian,
        }
        failed = {"fisher": steps.scatter(~flat["ok_f"]), "hessian": steps.scatter(~flat["ok_h"])}
        delta_f, tau_h = step.thresholds or (math.nan, math.nan)
        settings = {"delta_f": delta_f, "tau_h": tau_h, "calibrating": float(step.calibrating)}
        return Selection(
            token_mask, judged=steps.valid, failed=failed, shifts=out_shifts, settings=settings
        )

    def abandon(self) -> None:
        """Forget the step in progress (its judged parts); the shadow Adam and calibration, which
        only :meth:`close` changes, stay as they were before the step."""
        self._step = None

    def _start_step(self, view: TokenView, vocab: int) -> StepInProgress:
        """What every judged part of a step shares: the optimizer model, the thresholds, the
        calibration phase."""
        calibrating = self.calibration_steps > 0 and not bool(self.calibration_done)
        return StepInProgress(
            direction=self._direction(),
            lr=view.lr,
            base_lr=view.base_lr if view.base_lr is not None else view.lr,
            vocab=vocab,
            length=view.response_mask.shape[1],
            all_reduce=view.all_reduce,
            calibrating=calibrating,
            thresholds=None if calibrating else self.thresholds(),
            # an Adam (not raw) direction
            recordable=self.optimizer_model == "sgd" or bool(self.adam_has_rows),
        )

    def _tests(
        self, shifts: curvature.Shifts, thresholds: tuple[float, float] | None
    ) -> tuple[Tensor, Tensor]:
        """(m_F passes, m_H passes) per token; ``thresholds`` None (a calibration warm-up step)
        passes all."""
        if thresholds is None:
            passed = torch.ones_like(shifts.fisher, dtype=torch.bool)
            return passed, passed.clone()
        delta_f, tau_h = thresholds
        ok_f = shifts.fisher < delta_f
        low = -tau_h < shifts.hessian if self.symmetric else shifts.hessian >= 0
        return ok_f, low & (shifts.hessian < tau_h)
