"""Metric dictionaries of a step, kept out of the module so the step pipeline stays readable.

Keys are namespaced and stable (see README "Metrics"): ``train/*`` rewards, ``rollout/*`` sampling
side, ``objective/*`` loss side, ``time/*`` timings, ``val/*`` and ``test/*`` evaluation
(:mod:`capo_lightning.evaluation`). :class:`StepClock` times the steps without the validations
between them.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.objectives.functional import zero_std_group_fraction


def accumulate(metrics: dict[str, Tensor], new: dict[str, Tensor], weight: float = 1.0) -> None:
    """Add ``weight`` x each value of ``new`` into ``metrics`` (a weighted mean over updates or
    micro-batches)."""
    for key, value in new.items():
        value = value.detach().float() * weight
        metrics[key] = metrics[key] + value if key in metrics else value


def rollout_metrics(batch: RolloutBatch) -> dict[str, Tensor]:
    """Reward and sampling statistics of a training batch, plus the DataModule's own stats."""
    lengths = batch.response_mask.sum(dim=1).float()  # [N]
    out = {
        keys.REWARD_MEAN: batch.rewards.mean(),
        keys.REWARD_STD: batch.rewards.std()
        if batch.num_completions > 1
        else torch.zeros((), dtype=torch.float32),
        keys.ACCURACY: (batch.rewards > 0.5).float().mean(),
        keys.RESPONSE_LENGTH_MEAN: lengths.mean(),
        keys.RESPONSE_LENGTH_MAX: lengths.max(),
        keys.TRUNCATED_FRAC: batch.truncated.float().mean(),
        keys.ZERO_STD_GROUPS: zero_std_group_fraction(batch.rewards, batch.group_ids),
    }
    out.update({k: torch.tensor(float(v), dtype=torch.float32) for k, v in batch.stats.items()})
    return out


def sample_text(batch: RolloutBatch, step: int) -> str:
    """One prompt, its completion, reward and gold answer, for the console."""
    t = batch.texts
    return (
        f"[step {step}] reward={float(batch.rewards[0]):.2f}\n"
        f"{t.prompts[0]}{t.completions[0]}\n(gold: {t.answers[0]})"
    )


class StepClock:
    """Wall-clock seconds of each training step, the validations run between two steps left out.

    A step's time runs from the previous step's logging to its own (:meth:`step_seconds`); a
    validation in between is timed on its own (:meth:`validation_started`,
    :meth:`validation_ended`, logged as ``time/val_s``) and subtracted, so ``time/step_s`` is the
    step alone.
    """

    def __init__(self) -> None:
        self.last_step_end: float | None = None
        self.val_seconds, self.val_start = 0.0, 0.0

    def step_seconds(self) -> float | None:
        """Seconds since the previous step's call, less the validations since; None at the first."""
        now = time.perf_counter()
        seconds = None
        if self.last_step_end is not None:
            seconds = now - self.last_step_end - self.val_seconds
        self.last_step_end, self.val_seconds = now, 0.0
        return seconds

    def validation_started(self) -> None:
        self.val_start = time.perf_counter()

    def validation_ended(self) -> float:
        """This validation's seconds (also kept, to be left out of the next step's time)."""
        seconds = time.perf_counter() - self.val_start
        self.val_seconds += seconds
        return seconds
