"""What one step hands to its observers: a typed record instead of a dict of probes.

Lightning's manual optimisation accepts only a Mapping, a Tensor or None from ``training_step``, so
the module returns ``{STEP_KEY: StepResult}`` and every callback reads it with :func:`step_result`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from capo_lightning.selection import Selection

STEP_KEY = "step"  # the one key of training_step's returned mapping


@dataclass(frozen=True)
class SelectionStats:
    """The step's selection counted over every rank once, shared by the monitors and the collapse
    detector.

    Attributes:
        judged: response tokens the selector tested.
        rejected: judged tokens that failed any of its tests (or that its mask dropped, for a
            selector that declares no tests); for a measuring selector, what it would have rejected.
        by_test: test name -> judged tokens that failed it, for the tests the selector declares
            (``Selection.failed``).
        judged_pos, rejected_pos, judged_neg, rejected_neg: the same split by the sign of the
            token's advantage (zero-advantage tokens count in neither).
    """

    judged: float
    rejected: float
    by_test: dict[str, float]
    judged_pos: float
    rejected_pos: float
    judged_neg: float
    rejected_neg: float

    @property
    def reject_rate(self) -> float:
        """Rejected over judged tokens (0 when none was judged)."""
        return self.rejected / max(self.judged, 1.0)

    @classmethod
    def count(
        cls, selection: Selection, advantages: Tensor, all_reduce: Callable[[Tensor], Tensor] | None
    ) -> SelectionStats | None:
        """Count ``selection`` over all ranks (one all-reduce of one int64 vector); None when no
        selector ran."""
        if selection.judged is None:
            return None
        judged, rejected = selection.judged, selection.rejected()
        adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(judged)
        positive, negative = adv > 0, adv < 0
        tests = list(selection.failed)
        counts = [
            judged.sum(),
            rejected.sum(),
            *((judged & selection.failed[t]).sum() for t in tests),
        ]
        counts += [(judged & positive).sum(), (rejected & positive).sum()]
        counts += [(judged & negative).sum(), (rejected & negative).sum()]
        total = torch.stack(counts)
        values = [
            float(v) for v in (all_reduce(total) if all_reduce is not None else total).tolist()
        ]
        n = len(tests)
        return cls(values[0], values[1], dict(zip(tests, values[2 : 2 + n])), *values[2 + n :])


@dataclass
class StepResult:
    """One training step, as its observers see it.

    Attributes:
        schedule: the name of the schedule that ran
            (:class:`~capo_lightning.training.schedules.Schedule`).
        selection: the selector's decision (a keep-everything Selection without a selector).
        advantages: [N] the objective's advantages of the batch's completions.
        loss: the step's loss as the optimizer saw it (summed over micro-batches, averaged over
            updates).
        metrics: every metric the step produced (``objective/*``, ``train/*``, ``rollout/*``,
            ``time/*``).
        stats: the selection counted over every rank (None without a selector).
    """

    schedule: str
    selection: Selection
    advantages: Tensor
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    stats: SelectionStats | None = None


def step_result(outputs: Any) -> StepResult | None:
    """The StepResult inside ``training_step``'s returned mapping (None for anything else)."""
    found = outputs.get(STEP_KEY) if isinstance(outputs, Mapping) else None
    return found if isinstance(found, StepResult) else None
