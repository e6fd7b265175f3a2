"""A CAPO step in progress: what :meth:`CAPOSelector.judge` collects micro-batch by micro-batch
until ``close()``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from capo_lightning.selection.curvature import Direction, Shifts
from capo_lightning.selection.subspace import TopK


@dataclass
class JudgedPart:
    """One judged micro-batch: which step rows it holds and the per-token values of its T valid
    tokens."""

    rows: Tensor  # [n] the step rows of the micro-batch
    valid: Tensor  # [n, L] bool, its response mask
    top: TopK  # [T, k] each token's top-k policy
    hidden: Tensor  # [T, d] fp32 LM-head inputs
    adv: Tensor  # [T] advantages
    seq: Tensor  # [T] the step row of each token
    shifts: Shifts  # [T] each token's m_F, m_H and their parts
    ok_f: Tensor  # [T] bool, passed the m_F test
    ok_h: Tensor  # [T] bool, passed the m_H test
    keep: Tensor  # [T] bool, kept (all True when the selector does not enforce)


@dataclass
class StepInProgress:
    """The step being judged: what all its micro-batches share, fixed by its first ``judge()``, and
    the parts so far.

    A step judges each of its rows exactly once, every micro-batch with the same response length and
    learning rate; :meth:`admits` tells whether a micro-batch can belong to this step,
    and :meth:`check_complete` whether the parts cover the step's rows 0..N-1 once each (what
    ``close()`` places back into [N, L]).
    """

    direction: Direction  # the optimizer model, with the shadow-Adam step read when the step began
    lr: float  # the learning rate of the coming optimizer step
    base_lr: float  # the optimizer's configured (peak) lr
    vocab: int  # V, rows of the LM head
    length: int  # L, the response length of every view of the step
    all_reduce: Callable[[Tensor], Tensor] | None  # sums over ranks (None: one process)
    calibrating: bool  # a calibration warm-up step: nothing masked, the tokens recorded
    thresholds: tuple[float, float] | None  # (delta_F, tau_H) in force; None while calibrating
    recordable: bool  # the directions are the optimizer model's (not the raw-gradient fallback)
    parts: list[JudgedPart] = field(default_factory=list)

    def admits(self, length: int, lr: float, rows: Tensor) -> bool:
        """Whether a micro-batch of response length ``length``, judged at ``lr``, with step rows
        ``rows``, can belong to this step: same length and lr, and none of its rows judged
        already."""
        if length != self.length or lr != self.lr:
            return False
        return not self.parts or not bool(torch.isin(rows.cpu(), self.rows()).any())

    def rows(self) -> Tensor:
        """[sum n] the step rows judged so far, in part order (on the CPU)."""
        return torch.cat([part.rows.cpu() for part in self.parts])

    def check_complete(self) -> None:
        """Raise unless the parts hold the step rows 0..N-1 exactly once each."""
        judged = self.rows()
        if not torch.equal(judged.sort().values, torch.arange(judged.numel())):
            raise RuntimeError(
                "CAPOSelector.close(): the judged micro-batches hold the step rows "
                f"{judged.tolist()}, not each of 0..N-1 once; judge() every micro-batch of the "
                "step (each row once) before close(), and call abandon() when a step fails before "
                "close()"
            )

    def tokens(self, name: str) -> Tensor:
        """A per-token field of :class:`JudgedPart` (``hidden``, ``adv``, ``seq``, ``keep``, ...) of
        all parts, [T]."""
        return torch.cat([getattr(part, name) for part in self.parts])

    def top(self) -> TopK:
        """Every judged token's top-k policy, in part order."""
        return TopK(
            *(torch.cat([getattr(part.top, f.name) for part in self.parts]) for f in fields(TopK))
        )

    def shifts(self) -> Shifts:
        """Every judged token's shifts, in part order."""
        return Shifts(
            *(
                torch.cat([getattr(part.shifts, f.name) for part in self.parts])
                for f in fields(Shifts)
            )
        )


def continuing(
    step: StepInProgress | None, length: int, lr: float, rows: Tensor
) -> StepInProgress | None:
    """``step``, the open record, if a micro-batch of response length ``length`` judged at ``lr``
    with step rows ``rows`` can belong to it; None when a new step begins.

    A record that cannot hold the micro-batch (one of ``rows`` judged already, another length or lr)
    was left by a step that failed between ``judge()`` and ``close()`` without ``abandon()``: it is
    dropped with a warning, so its parts never reach the new step. A failed step whose judged rows
    all differ from the new step's first micro-batch (same length and lr) slips past here, but not
    far: a step judges all its rows, so a later micro-batch repeats one of the stale rows and drops
    the record, and ``close()`` then finds the new step's first rows missing and raises
    (:meth:`StepInProgress.check_complete`) rather than mix two steps.
    """
    if step is None or step.admits(length, lr, rows):
        return step
    warnings.warn(
        "CAPOSelector: dropped the judged micro-batches of an earlier step that never reached "
        "close(); a step that fails between judge() and close() should call selector.abandon()",
        RuntimeWarning,
        stacklevel=3,
    )
    return None
