"""The checkpointed state of :class:`~capo_lightning.selection.capo.CAPOSelector`: the shadow Adam
(m, v per vocabulary row, one step counter) and the calibration warm-up (its tokens, then the
thresholds it set), how each advances, and how the state moves and loads (never cast; shapes taken
from the checkpoint)."""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning.selection import calibration, curvature
from capo_lightning.selection.base import Selector
from capo_lightning.selection.capo_step import StepInProgress


class CAPOState(Selector):
    """Buffers and state updates of a CAPO selector; the subclass
    :class:`~capo_lightning.selection.capo.CAPOSelector` sets the settings they read
    (``optimizer_model``, ``betas``, ``eps``, ``delta_f``, ``tau_h`` and the ``calibration_*``
    ones) and makes the decision."""

    def _register_state(self) -> None:
        """The buffers, all in the checkpoint (the shadow Adam's [V, d] ones sized by
        :meth:`build`)."""
        self.register_buffer("adam_m", torch.zeros(0, 0, dtype=torch.float32))  # [V, d] once built
        self.register_buffer("adam_v", torch.zeros(0, 0, dtype=torch.float32))  # [V, d]
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))
        # any row ever updated
        self.register_buffer("adam_has_rows", torch.zeros((), dtype=torch.bool))
        # calibration: the warm-up's tokens as lr-free (a, b, c) [3, T] (all ranks), steps seen, and
        # the thresholds
        self.register_buffer("calibration_parts", torch.zeros(3, 0, dtype=torch.float64))
        self.register_buffer("calibration_seen", torch.zeros((), dtype=torch.long))
        # delta_F, tau_H once set
        self.register_buffer("calibrated", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("calibration_done", torch.zeros((), dtype=torch.bool))

    def build(self, num_vocab: int, hidden_size: int) -> None:
        """Allocate the shadow-Adam state for a [V, d] LM head (before a checkpoint is restored)."""
        if self.optimizer_model == "adam" and tuple(self.adam_m.shape) != (num_vocab, hidden_size):
            device = self.adam_m.device
            self.adam_m = torch.zeros(num_vocab, hidden_size, device=device, dtype=torch.float32)
            self.adam_v = torch.zeros(num_vocab, hidden_size, device=device, dtype=torch.float32)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """Move the shadow-Adam state with the module, but never cast it: a true half-precision run
        (``bf16-true``) converts the whole LightningModule, and m, v must stay fp32 whatever the
        model's dtype."""
        state = {
            name: getattr(self, name)
            for name in ("adam_m", "adam_v", "calibration_parts", "calibrated")
        }
        super()._apply(fn, recurse)
        for name, kept in state.items():
            moved = getattr(self, name)
            if moved.dtype != kept.dtype:
                # exact: the fp32 values, not a round trip
                setattr(self, name, kept.to(device=moved.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Take the shadow-Adam shape of the state being loaded when this selector was never built
        (e.g. the unconfigured module that ``ddp_spawn`` copies the trained weights back into), and
        the calibration warm-up's size, whatever it is; a checkpoint without calibration state loads
        as never calibrated."""
        for name in ("calibration_parts", "calibration_seen", "calibrated", "calibration_done"):
            # a checkpoint from before calibration existed
            state_dict.setdefault(prefix + name, getattr(self, name))
        for name in ("adam_m", "adam_v", "calibration_parts"):
            incoming, current = state_dict.get(prefix + name), getattr(self, name)
            if incoming is None or incoming.shape == current.shape:
                continue
            # the warm-up grows
            if name == "calibration_parts" or (current.numel() == 0 and incoming.numel()):
                setattr(self, name, torch.zeros_like(incoming, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def thresholds(self) -> tuple[float, float]:
        """(delta_F, tau_H) in force: the calibrated ones once the warm-up has set them, else the
        configured."""
        if self.calibration_steps > 0 and bool(self.calibration_done):
            return float(self.calibrated[0]), float(self.calibrated[1])
        return self.delta_f, self.tau_h

    def _calibration_step(
        self, shifts: curvature.Shifts, adv: Tensor, step: StepInProgress
    ) -> None:
        """Record a warm-up step's tokens (non-zero advantage, Adam directions, all ranks); after
        the last warm-up step that recorded any, set the thresholds
        (:mod:`~capo_lightning.selection.calibration`)."""
        if step.recordable:
            parts = calibration.lr_free_parts(shifts, adv)[:, adv != 0]
            parts = calibration.gather_by_sum(parts, step.all_reduce).to(self.calibration_parts)
            self.calibration_parts = torch.cat([self.calibration_parts, parts], dim=1)
        self.calibration_seen += 1
        if (
            int(self.calibration_seen) >= self.calibration_steps
            and self.calibration_parts.shape[1] > 0
        ):
            lr_ref = self.calibration_lr or step.base_lr
            found = calibration.thresholds(
                self.calibration_parts, lr_ref, self.calibration_percentile
            )
            self.calibrated = torch.tensor(
                found, dtype=torch.float64, device=self.calibrated.device
            )
            self.calibration_done.fill_(True)

    def _direction(self) -> curvature.Direction:
        """The optimizer model (:data:`~capo_lightning.selection.curvature.Direction`) of this
        selector, with the shadow-Adam step read once here (one host sync per selection, none in the
        curvature loops)."""
        if self.optimizer_model == "sgd":
            return lambda grads, _ids: grads
        # the raw gradient while no row has ever been updated (also after steps that accepted
        # nothing), as the official code's empty-dictionary check
        step = int(self.adam_step) if bool(self.adam_has_rows) else 0
        return lambda grads, ids: curvature.adam_direction(
            grads, self.adam_m[ids], self.adam_v[ids], step, self.betas, self.eps
        )

    def _advance(self, rows: Tensor, g: Tensor) -> None:
        """One shadow-Adam step on ``rows`` [R] (the touched ones) with their accepted-token mean
        gradient [R, d]."""
        b1, b2 = self.betas
        self.adam_m[rows] = b1 * self.adam_m[rows] + (1 - b1) * g
        self.adam_v[rows] = b2 * self.adam_v[rows] + (1 - b2) * g * g
        self.adam_step += 1
        self.adam_has_rows |= rows.numel() > 0
