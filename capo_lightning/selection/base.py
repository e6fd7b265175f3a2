"""The Selector contract: decide which response tokens enter the gradient."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from capo_lightning import keys
from capo_lightning.selection.stats import shift_stats


@dataclass
class TokenView:
    """Everything a selector may look at for one step; every tensor is detached."""

    actions: Tensor  # [N, L] sampled token ids
    response_mask: Tensor  # [N, L] bool
    advantages: Tensor  # [N, L] sequence advantages broadcast over tokens
    # [N, L]; None for a selector that reads no forward pass (``needs_forward``)
    old_logprobs: Tensor | None
    # [N, L, d] LM-head input (after the final norm); None if the selector needs none
    hidden: Tensor | None
    lm_head: Tensor | None  # [V, d] full LM-head weight
    lr: float  # learning rate the coming optimizer step will use
    # sums a tensor over ranks (None: one process)
    all_reduce: Callable[[Tensor], Tensor] | None = None
    # [N, L, k] ids of the k largest logits, from the scoring forward (``forward_topk``)
    topk_ids: Tensor | None = None
    # the optimizer's configured lr, the schedule's peak (None: unknown, use ``lr``)
    base_lr: float | None = None


@dataclass
class Selection:
    """A selector's decision: the token mask plus what it measured on the way.

    The names are the selector's own: ``failed`` declares its tests, ``shifts`` its measured shifts,
    ``settings`` what it runs with; the monitors log whatever is declared
    (``select/reject_rate_<test>``, ``curvature/<shift>_*``, ``select/<setting>``), so a new
    selector is monitored without touching them.
    """

    token_mask: Tensor  # [N, L] bool, True = keep
    # [N, L] bool, the tokens the selector tested (None: no selector ran)
    judged: Tensor | None = None
    # test name -> [N, L] bool, True = failed it
    failed: dict[str, Tensor] = field(default_factory=dict)
    # per-token [N, L] or step-level scalar shifts
    shifts: dict[str, Tensor] = field(default_factory=dict)
    # e.g. CAPO's thresholds in force (NaN: not yet set)
    settings: dict[str, float] = field(default_factory=dict)

    def rejected(self) -> Tensor:
        """[N, L] bool: the judged tokens that failed any declared test (also when the selector only
        measures); a selector that declares no tests rejects what its mask drops."""
        if self.failed:
            return self.judged & torch.stack(list(self.failed.values())).any(dim=0)
        return self.judged & ~self.token_mask

    @property
    def metrics(self) -> dict[str, Tensor]:
        """One rank's view of the decision, computed when read (for inspection and tests; the
        monitors log the step's counts over all ranks instead): the rejection rates, the settings,
        and each shift's statistics over this rank's judged and kept tokens (step-level shifts as
        they are)."""
        if self.judged is None:
            return {}
        judged = max(int(self.judged.sum()), 1)
        out = {keys.TOKEN_REJECT_RATE: self.rejected().sum().float() / judged}
        out.update(
            {
                keys.reject_rate(t): (self.judged & f).sum().float() / judged
                for t, f in self.failed.items()
            }
        )
        out.update(
            {keys.threshold(name): torch.tensor(value) for name, value in self.settings.items()}
        )
        kept = self.judged & self.token_mask
        for name, value in self.shifts.items():
            if value.dim() == 0:
                out[keys.shift(name)] = value
                continue
            out.update(shift_stats(keys.shift(name), value[self.judged]))
            out.update(shift_stats(keys.shift(name, masked=True), value[kept]))
        return out


class Selector(nn.Module, ABC):
    """Chooses tokens for the gradient; never computes a loss. Called under ``torch.no_grad()``."""

    # whether the decision reads a forward pass (old logprobs, hidden states, top-k); when False the
    # mask is decided before any forward, and micro-batched steps need no look-ahead pass
    needs_forward: bool = False
    needs_hidden: bool = False  # whether TokenView.hidden and .lm_head must be filled
    # how many top logit ids per token the scoring forward should hand over (0: none)
    forward_topk: int = 0
    # judge(view, rows) per micro-batch inside the training forwards, then close(): no look-ahead
    # pass; a selector whose per-token decision needs the whole step keeps False
    streams: bool = False

    def build(self, num_vocab: int, hidden_size: int) -> None:  # noqa: B027 (optional hook)
        """Allocate state sized by the policy's [V, d] LM head; the module calls it before a
        checkpoint is restored, so buffers exist to load into. Nothing to allocate by default."""

    @abstractmethod
    def forward(self, view: TokenView) -> Selection:
        """Return the mask (and shifts, metrics) for ``view``."""

    def judge(self, view: TokenView, rows: Tensor) -> Tensor:
        """(``streams`` selectors) The keep mask [n, L] of one micro-batch, rows ``rows`` of the
        step."""
        raise NotImplementedError(f"{type(self).__name__} does not stream (streams = False)")

    def close(self) -> Selection:
        """(``streams`` selectors) The step's Selection, [N, L], once every micro-batch has been
        judged."""
        raise NotImplementedError(f"{type(self).__name__} does not stream (streams = False)")

    def abandon(self) -> None:  # noqa: B027 (optional hook)
        """Forget the step in progress. The step calls it when it fails after a :meth:`judge` and
        before :meth:`close` (an exception in a forward, a backward or a judge), so nothing judged
        in the failed step reaches the next one; state that only :meth:`close` changes stays as it
        was before the failed step. Safe to call at any time, also with no step in progress. A no-op
        by default (nothing is kept between ``judge`` and ``close``)."""


def keep_out_of_ddp_broadcasts(owner: nn.Module, name: str = "selector") -> None:
    """Keep the buffers of ``owner.<name>`` (a selector's state) out of DDP's buffer broadcasts: the
    initial sync and, with ``broadcast_buffers`` (DDP's default), the one from rank 0 before every
    forward.

    That state is identical on every rank by construction (it starts empty or from the same
    checkpoint, and each update uses gradients summed over ranks), so the broadcast only costs: at
    7B the shadow Adam's two [V, d] fp32 moments are 2 x 2.2 GB per step. Call it before the
    strategy wraps the module.
    """
    names = [f"{name}.{buffer}" for buffer, _ in getattr(owner, name).named_buffers()]
    ignored = sorted(set(getattr(owner, "_ddp_params_and_buffers_to_ignore", [])) | set(names))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(owner, ignored)
