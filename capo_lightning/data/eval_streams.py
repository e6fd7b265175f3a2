"""The validation and test side of :class:`~capo_lightning.data.datamodule.RolloutDataModule`, as
a mixin: the sources of a stage, their metric names, this rank's share of each as a stream, and the
eval batches (sampled with ``val_sampling``, ``val_samples`` per prompt, graded by
``eval_reward_fn`` with ``eval_template`` prompts)."""

from __future__ import annotations

from dataclasses import replace

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.data.eval_sets import set_names, shard
from capo_lightning.data.prompts import PromptSource
from capo_lightning.data.rollout import RolloutStream
from capo_lightning.rewards.base import pop_stats


class EvalStreams:
    """Lightning's ``val_dataloader`` and ``test_dataloader`` for a LightningDataModule (listed
    before it in the bases) that holds the evaluation settings (``val_source``, ``test_source``,
    ``val_prompts``, ``val_batch_size``, ``val_samples``, ``val_sampling``, ``eval_reward_fn``,
    ``eval_template``, ``seed``) and makes batches (``_maker``, ``_policy_version``, ``position``,
    ``_rank``, ``_world``)."""

    def val_dataloader(self) -> RolloutStream | list[RolloutStream]:
        """Validation batches, generated with the current weights when iterated (one stream per
        source)."""
        return self._eval_streams("val")

    def test_dataloader(self) -> RolloutStream | list[RolloutStream]:
        """Like validation, on ``test_source`` (falls back to ``val_source``)."""
        return self._eval_streams("test")

    def eval_sources(self, stage: str) -> list[PromptSource]:
        """The sources of ``stage`` ("val" or "test"), as a list."""
        source = (
            self.test_source
            if stage == "test" and self.test_source is not None
            else self.val_source
        )
        return (
            []
            if source is None
            else list(source)
            if isinstance(source, (list, tuple))
            else [source]
        )

    def eval_names(self, stage: str) -> list[str]:
        """Metric names of the sources of ``stage``
        (see :func:`~capo_lightning.data.eval_sets.set_names`)."""
        return set_names(self.eval_sources(stage))

    def _eval_streams(self, stage: str) -> RolloutStream | list[RolloutStream]:
        streams = [self._eval_stream(source) for source in self.eval_sources(stage)]
        return streams[0] if len(streams) == 1 else streams

    def _eval_stream(self, source: PromptSource) -> RolloutStream:
        """This rank's share of the first ``val_prompts`` items
        (:func:`~capo_lightning.data.eval_sets.shard`)."""
        count = self.val_prompts if source.size is None else min(self.val_prompts, source.size)
        chunks = shard(count, self._rank(), self._world(), self.val_batch_size)
        return RolloutStream(len(chunks), lambda i: self._eval_batch(source, chunks[i], count))

    def _eval_batch(self, source: PromptSource, indices: list[int], count: int) -> RolloutBatch:
        version, step = self._policy_version(), self.position.batches
        maker = self._maker()
        items = [source.item(i % count) for i in indices]
        sampling = replace(self.val_sampling, seed=self.seed + 17 * indices[0])
        sampled = maker.sample(
            items, self.val_samples, sampling, self.eval_reward_fn, self.eval_template
        )
        stats = sampled.stats | {keys.VALID_PROMPTS: float(sum(i < count for i in indices))}
        return maker.collate(
            sampled.groups,
            version,
            step,
            stats | pop_stats(self.eval_reward_fn),
            sampling.max_new_tokens,
        )
