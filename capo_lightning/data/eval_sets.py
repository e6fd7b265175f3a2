"""Evaluation data: the sets' metric names, each rank's share of a set, what the module is told,
validation sampling."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_warn

from capo_lightning.data.prompts import PromptSource
from capo_lightning.rollout.engine import SamplingConfig


@dataclass(frozen=True)
class EvalSpec:
    """What evaluation needs to know about the data, returned by :meth:`RolloutDataModule.connect`.

    Attributes:
        val_names: metric names of the validation sets, in dataloader order.
        test_names: metric names of the test sets (the validation sets when no test source is set).
        samples: completions per problem (the n of pass@k).
    """

    val_names: tuple[str, ...] = ()
    test_names: tuple[str, ...] = ()
    samples: int = 1

    def names(self, stage: str) -> list[str]:
        """The set names of ``stage`` ("val" or "test")."""
        return list(self.test_names if stage == "test" else self.val_names)


def set_names(sources: list[PromptSource]) -> list[str]:
    """Metric names of ``sources``: ``source.name()`` made key-safe and unique
    (``val/<name>/accuracy``)."""
    names: list[str] = []
    for source in sources:
        name = re.sub(r"[^A-Za-z0-9_.:-]+", "_", source.name())
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def shard(count: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """The batches of item indices of ``rank`` among the first ``count`` items: rank r takes r, r +
    W, r + 2W, ...

    Every rank gets the same number of indices, hence of batches (FSDP needs equal collective
    calls):
    a rank whose share is short gets indices >= ``count``, which the caller maps back into range
    (repeats) and excludes from the metrics (``stats["eval/valid_prompts"]``).
    """
    per_rank = math.ceil(count / world)
    indices = [rank + j * world for j in range(per_rank)]
    return [indices[s : s + batch_size] for s in range(0, per_rank, batch_size)]


def default_val_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """Validation samples at temperature 0.6, top_p 0.95 with the training budget."""
    return SamplingConfig(
        max_new_tokens=sampling.max_new_tokens, temperature=0.6, top_p=0.95, top_k=0
    )


def warn_if_greedy_with_samples(val_sampling: SamplingConfig, val_samples: int) -> None:
    """Warn when several validation samples per problem are drawn greedily (they are identical)."""
    if val_sampling.temperature == 0 and val_samples > 1:
        rank_zero_warn(
            "capo: data.val_sampling is greedy (temperature 0) but "
            f"data.val_samples={val_samples}: the samples are identical, so pass@k equals pass@1; "
            "set data.val_samples=1 or a temperature > 0"
        )
