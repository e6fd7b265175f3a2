"""Metric dictionaries of a step, kept out of the module so the step pipeline stays readable.

Keys are namespaced and stable (see README "Metrics"): ``train/*`` rewards, ``rollout/*`` sampling
side, ``objective/*`` loss side, ``time/*`` timings, ``val/*`` and ``test/*`` evaluation
(:mod:`capo_lightning.evaluation`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.objectives.functional import zero_std_group_fraction


def accumulate(metrics: dict[str, Tensor], new: dict[str, Tensor], weight: float = 1.0) -> None:
    """Add ``weight`` x each value of ``new`` into ``metrics`` (a weighted mean over updates or micro-batches)."""
    for key, value in new.items():
        value = value.detach().float() * weight
        metrics[key] = metrics[key] + value if key in metrics else value


def rollout_metrics(batch: RolloutBatch) -> dict[str, Tensor]:
    """Reward and sampling statistics of a training batch, plus the DataModule's own stats."""
    lengths = batch.response_mask.sum(dim=1).float()  # [N]
    out = {
        keys.REWARD_MEAN: batch.rewards.mean(),
        keys.REWARD_STD: batch.rewards.std() if batch.num_completions > 1 else torch.zeros((), dtype=torch.float32),
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
        f"[step {step}] reward={float(batch.rewards[0]):.2f}\n{t.prompts[0]}{t.completions[0]}\n(gold: {t.answers[0]})"
    )
