"""The DataModule that streams freshly generated, scored rollouts."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from capo_lightning.batch import RolloutBatch
from capo_lightning.data.collate import collate_completions
from capo_lightning.data.prompts import ArithmeticSource, PromptItem, PromptSource
from capo_lightning.data.templates import PromptTemplate, get_template
from capo_lightning.rewards.math import math_reward, pop_stats
from capo_lightning.rollout.engine import Completion, RolloutEngine, SamplingConfig

RewardFn = Callable[..., list[float]]


@dataclass
class _Group:
    """The G scored completions of one prompt."""

    item: PromptItem
    prompt: str  # formatted
    completions: list[Completion]
    rewards: list[float]

    def varies(self, tol: float = 1e-6) -> bool:
        """True when the rewards differ (max - min > tol), i.e. the group has a learning signal."""
        return max(self.rewards) - min(self.rewards) > tol


class RolloutDataModule(L.LightningDataModule):
    """Streams rollout batches: B prompts, G completions each, scored by a reward function.

    The train stream is *sized* (``steps_per_epoch``), so Lightning does not prefetch: batch k is
    generated only after step k-1 updated the weights (staleness 0). Prompts of rollout step k are a
    pure function of (seed, k, rank), so resuming at step k replays exactly the prompts it would
    have seen. The module connects the engine and tokenizer in its ``setup`` (see :meth:`connect`).

    Args:
        train_source: where training prompts come from.
        val_source: prompts for validation, or a list of sources, each logged under its own name
            (``val/<name>/accuracy``, see :meth:`eval_names`); None disables validation.
        test_source: prompts for ``capo test`` (a source or a list); None uses ``val_source``.
        prompts_per_step: B, prompts per optimizer step per rank.
        group_size: G, completions sampled per prompt.
        sampling: how training completions are sampled.
        val_sampling: how validation completions are sampled (default: temperature 0.6, top_p 0.95).
        val_samples: completions per validation prompt (n of pass@k; k <= n).
        val_prompts: how many prompts of each validation source to use (its first ones).
        val_batch_size: validation prompts per generation batch.
        reward_fn: ``reward(completions, answers, **columns) -> list[float]`` for training. If it has a
            ``pop_stats()`` method (the math rewards do), its stats are logged with each batch.
        eval_reward_fn: the correctness grader of validation and test (1.0 = correct); keep it unshaped.
        template: prompt template name (:mod:`capo_lightning.data.templates`: ``chat``, ``paper``,
            ``eval``, ``qwen_math``, ``plain``).
        system_prompt: replaces the template's system message.
        eval_template: template of validation and test prompts; None = ``template``. The paper trains
            with ``paper`` and reports TEST accuracy with ``eval``.
        max_prompt_tokens: longest allowed formatted prompt, in tokens.
        steps_per_epoch: length of one pass of the train stream (an epoch is bookkeeping only).
        seed: seeds prompt order and sampling.
        dynamic_sampling: DAPO's dynamic sampling: drop groups whose rewards all agree and refill with
            fresh prompts until B varied groups are found.
        max_sampling_rounds: generation rounds per step at most, with dynamic sampling; then the batch
            is topped up with zero-variance groups and a warning is logged.
    """

    def __init__(
        self,
        train_source: PromptSource | None = None,
        val_source: PromptSource | list[PromptSource] | None = None,
        test_source: PromptSource | list[PromptSource] | None = None,
        prompts_per_step: int = 4,
        group_size: int = 8,
        sampling: SamplingConfig | None = None,
        val_sampling: SamplingConfig | None = None,
        val_samples: int = 1,
        val_prompts: int = 32,
        val_batch_size: int = 16,
        reward_fn: RewardFn = math_reward,
        eval_reward_fn: RewardFn = math_reward,
        template: str = "chat",
        system_prompt: str | None = None,
        eval_template: str | None = None,
        max_prompt_tokens: int = 512,
        steps_per_epoch: int = 100,
        seed: int = 0,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 4,
    ) -> None:
        super().__init__()
        for name, value in (
            ("prompts_per_step", prompts_per_step),
            ("group_size", group_size),
            ("val_samples", val_samples),
            ("val_batch_size", val_batch_size),
            ("steps_per_epoch", steps_per_epoch),
            ("max_prompt_tokens", max_prompt_tokens),
        ):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        self.train_source = train_source if train_source is not None else ArithmeticSource(seed=seed)
        self.val_source = val_source
        self.test_source = test_source
        self.template = get_template(template)
        self.eval_template = self.template if eval_template is None else get_template(eval_template)
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.val_sampling = (
            val_sampling
            if val_sampling is not None
            else SamplingConfig(max_new_tokens=self.sampling.max_new_tokens, temperature=0.6, top_p=0.95, top_k=0)
        )
        self.val_samples = val_samples
        if self.val_sampling.temperature == 0 and val_samples > 1:
            rank_zero_warn(
                f"capo: data.val_sampling is greedy (temperature 0) but data.val_samples={val_samples}: the samples "
                "are identical, so pass@k equals pass@1; set data.val_samples=1 or a temperature > 0"
            )
        self.val_prompts = val_prompts
        self.val_batch_size = val_batch_size
        self.reward_fn = reward_fn
        self.eval_reward_fn = eval_reward_fn
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        if max_sampling_rounds < 1:
            raise ValueError(f"data.max_sampling_rounds must be >= 1, got {max_sampling_rounds}")
        self.dynamic_sampling = dynamic_sampling
        self.max_sampling_rounds = max_sampling_rounds
        self.engine: RolloutEngine | None = None
        self.tokenizer: Any = None
        self._state_fn: Callable[[], tuple[int, int]] = _initial_state  # a function, not a lambda: spawn pickles us
        self._perms: dict[tuple[int, int], list[int]] = {}

    # ---- wiring -------------------------------------------------------------------------------
    def connect(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        state_fn: Callable[[], tuple[int, int]],
        context_len: int | None = None,
    ) -> None:
        """Attach what exists only once the policy is built.

        Args:
            engine: the module's rollout engine (already bound to the policy).
            tokenizer: the policy's tokenizer.
            state_fn: returns (policy_version, rollout_step) at generation time.
            context_len: the model's maximum sequence length, checked against prompt + response budget.
        """
        self.engine, self.tokenizer, self._state_fn = engine, tokenizer, state_fn
        for name, sampling in (("sampling", self.sampling), ("val_sampling", self.val_sampling)):
            budget = self.max_prompt_tokens + sampling.max_new_tokens
            if context_len is not None and budget > context_len:
                raise ValueError(
                    f"data.max_prompt_tokens ({self.max_prompt_tokens}) + data.{name}.max_new_tokens "
                    f"({sampling.max_new_tokens}) = {budget} exceeds the model's context of {context_len} tokens; "
                    "lower one of them"
                )

    # ---- dataloaders --------------------------------------------------------------------------
    def train_dataloader(self) -> _Stream:
        """Sized stream of training rollout batches (no prefetch, staleness 0)."""
        return _Stream(self.steps_per_epoch, self._next_train_batch)

    def val_dataloader(self) -> _Stream | list:
        """Validation batches, generated with the current weights when iterated (one stream per source)."""
        return self._eval_streams("val")

    def test_dataloader(self) -> _Stream | list:
        """Like validation, on ``test_source`` (falls back to ``val_source``)."""
        return self._eval_streams("test")

    def eval_sources(self, stage: str) -> list[PromptSource]:
        """The sources of ``stage`` ("val" or "test"), as a list."""
        source = self.test_source if stage == "test" and self.test_source is not None else self.val_source
        return [] if source is None else list(source) if isinstance(source, (list, tuple)) else [source]

    def eval_names(self, stage: str) -> list[str]:
        """Metric names of the sources of ``stage``: ``source.name()`` made key-safe and unique."""
        names: list[str] = []
        for source in self.eval_sources(stage):
            name = re.sub(r"[^A-Za-z0-9_.:-]+", "_", source.name())
            names.append(name if name not in names else f"{name}_{len(names)}")
        return names

    def _eval_streams(self, stage: str) -> _Stream | list:
        streams = [self._eval_stream(source) for source in self.eval_sources(stage)]
        return streams[0] if len(streams) == 1 else streams

    def _eval_stream(self, source: PromptSource) -> _Stream:
        """This rank's share of the first ``val_prompts`` items: rank r takes r, r + W, r + 2W, ...

        Every rank gets the same number of batches (FSDP needs equal collective calls); a rank whose
        share is short pads its last batch with repeats, which ``stats["eval/valid_prompts"]`` excludes.
        """
        count = self.val_prompts if source.size is None else min(self.val_prompts, source.size)
        world, rank = self._world(), self._rank()
        per_rank = math.ceil(count / world)
        indices = [rank + j * world for j in range(per_rank)]
        chunks = [indices[s : s + self.val_batch_size] for s in range(0, per_rank, self.val_batch_size)]
        return _Stream(len(chunks), lambda i: self._eval_batch(source, chunks[i], count))

    # ---- batch construction -------------------------------------------------------------------
    def _next_train_batch(self, _: int) -> RolloutBatch:
        version, step = self._state_fn()
        items = [self._train_item(step, j) for j in range(self.prompts_per_step)]
        sampling = replace(self.sampling, seed=self.seed * 1_000_003 + step * 7919 + self._rank())
        groups, stats = self._sample_groups(items, self.group_size, sampling)
        if self.dynamic_sampling:
            groups, more = self._keep_varied_groups(groups, step, sampling)
            stats.update(more)
        return self._collate(groups, version, step, stats | pop_stats(self.reward_fn) | pop_stats(self.engine))

    def _eval_batch(self, source: PromptSource, indices: list[int], count: int) -> RolloutBatch:
        version, step = self._state_fn()
        items = [source.item(i % count) for i in indices]
        sampling = replace(self.val_sampling, seed=self.seed + 17 * indices[0])
        groups, stats = self._sample_groups(items, self.val_samples, sampling, self.eval_reward_fn, self.eval_template)
        stats["eval/valid_prompts"] = float(sum(i < count for i in indices))
        return self._collate(groups, version, step, stats | pop_stats(self.eval_reward_fn))

    def rollout(
        self, items: list[PromptItem], n: int, sampling: SamplingConfig, version: int, step: int
    ) -> RolloutBatch:
        """Generate ``n`` completions per item, score them and collate a RolloutBatch."""
        groups, stats = self._sample_groups(items, n, sampling, self.reward_fn)
        return self._collate(groups, version, step, stats)

    def _sample_groups(
        self,
        items: list[PromptItem],
        n: int,
        sampling: SamplingConfig,
        reward_fn: RewardFn | None = None,
        template: PromptTemplate | None = None,
    ) -> tuple[list[_Group], dict]:
        """Generate ``n`` completions per item and score them (default: training's reward and template)."""
        if self.engine is None:
            raise RuntimeError(
                "RolloutDataModule used before connect(); the CAPOModule connects it in configure_model()"
            )
        prompts = [self.format_prompt(item.prompt, template) for item in items]
        t0 = time.perf_counter()
        completions = self.engine.generate(prompts, n, sampling)
        gen_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        reward_fn = self.reward_fn if reward_fn is None else reward_fn
        items_n = [item for item in items for _ in range(n)]
        rewards = self._score(reward_fn, completions, items_n, sampling.max_new_tokens)
        reward_s = time.perf_counter() - t1
        groups = [
            _Group(item, prompt, completions[j * n : (j + 1) * n], rewards[j * n : (j + 1) * n])
            for j, (item, prompt) in enumerate(zip(items, prompts))
        ]
        tokens = sum(len(c.token_ids) for c in completions)
        stats = {"time/generate_s": gen_s, "time/reward_s": reward_s, "rollout/tokens_per_s": tokens / max(gen_s, 1e-9)}
        return groups, stats

    def _keep_varied_groups(
        self, groups: list[_Group], step: int, sampling: SamplingConfig
    ) -> tuple[list[_Group], dict]:
        """DAPO's dynamic sampling: keep groups whose rewards differ; refill with fresh prompts.

        At most ``max_sampling_rounds`` generation rounds; if B varied groups are still missing, the
        batch is topped up with zero-variance groups (advantage 0, no gradient) so every rank keeps
        exactly B groups, and a warning says so.
        """
        b = self.prompts_per_step
        kept = [g for g in groups if g.varies()]
        dropped = [g for g in groups if not g.varies()]
        generated, rounds = len(groups), 1
        while len(kept) < b and rounds < self.max_sampling_rounds:
            items = [self._refill_item(step, rounds, j) for j in range(b)]
            more, extra = self._sample_groups(
                items, self.group_size, replace(sampling, seed=sampling.seed + 104_729 * rounds)
            )
            kept += [g for g in more if g.varies()]
            dropped += [g for g in more if not g.varies()]
            generated, rounds = generated + len(more), rounds + 1
        filled = max(0, b - len(kept))
        if filled:
            rank_zero_warn(
                f"capo: dynamic sampling found {len(kept)} of {b} groups with varied rewards in "
                f"{rounds} rounds (data.max_sampling_rounds); {filled} zero-variance groups fill the batch"
            )
        batch_groups = (kept + dropped[:filled])[:b]
        stats = {
            "rollout/sampling_rounds": float(rounds),
            "rollout/groups_generated": float(generated),
            "rollout/groups_kept_frac": len(kept) / generated,
            "rollout/groups_filled": float(filled),
        }
        return batch_groups, stats

    def _collate(self, groups: list[_Group], version: int, step: int, stats: dict) -> RolloutBatch:
        n = len(groups[0].completions)
        batch = collate_completions(
            [c for g in groups for c in g.completions],
            [r for g in groups for r in g.rewards],
            [j for j in range(len(groups)) for _ in range(n)],
            pad_id=self.tokenizer.pad_token_id,
            policy_version=version,
            rollout_step=step,
            prompts=[g.prompt for g in groups for _ in range(n)],
            answers=[g.item.answer for g in groups for _ in range(n)],
        )
        batch.stats.update(stats)
        return batch

    def format_prompt(self, question: str, template: PromptTemplate | None = None) -> str:
        """Apply ``template`` (default ``data.template``); raise if the result exceeds max_prompt_tokens."""
        text = (template or self.template).format(question, self.tokenizer, self.system_prompt)
        num = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if num > self.max_prompt_tokens:
            raise ValueError(
                f"a prompt has {num} tokens after formatting, more than data.max_prompt_tokens="
                f"{self.max_prompt_tokens}: {question[:80]!r}... Raise data.max_prompt_tokens (prompt + "
                "max_new_tokens must fit the model's context) or remove long prompts from the source"
            )
        return text

    def _score(
        self, reward_fn: RewardFn, completions: list[Completion], items: list[PromptItem], max_new_tokens: int
    ) -> list[float]:
        """Call the reward function with each item's columns plus ``completion_tokens``, ``truncated``
        and ``max_new_tokens`` (what length-aware rewards such as OverlongPenalty read)."""
        texts = [c.text for c in completions]
        keys = sorted(set().union(*(item.columns for item in items)))
        cols: dict[str, list[Any]] = {k: [item.columns.get(k) for item in items] for k in keys}
        cols["completion_tokens"] = [len(c.token_ids) for c in completions]
        cols["truncated"] = [c.finish_reason == "length" for c in completions]
        cols["max_new_tokens"] = [max_new_tokens] * len(completions)
        rewards = [float(r) for r in reward_fn(texts, [item.answer for item in items], **cols)]
        name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
        if len(rewards) != len(texts):
            raise ValueError(f"data.reward_fn {name} returned {len(rewards)} rewards for {len(texts)} completions")
        if not all(math.isfinite(r) for r in rewards):
            raise ValueError(f"data.reward_fn {name} returned a non-finite reward: {rewards}")
        return rewards

    def _train_item(self, step: int, j: int) -> PromptItem:
        """Prompt j of rollout step ``step`` on this rank: a pure function of (seed, step, rank, j)."""
        index = (step * self._world() + self._rank()) * self.prompts_per_step + j
        return self._source_item(index, stream=0)

    def _refill_item(self, step: int, round_: int, j: int) -> PromptItem:
        """Prompt j of dynamic-sampling round ``round_`` (>= 1): drawn from a separate, seeded stream."""
        rounds = max(1, self.max_sampling_rounds - 1)
        index = ((step * rounds + round_ - 1) * self._world() + self._rank()) * self.prompts_per_step + j
        return self._source_item(index, stream=1)

    def _source_item(self, index: int, stream: int) -> PromptItem:
        size = self.train_source.size
        if size is None:  # unbounded generators: the refill stream lives far above any training index
            return self.train_source.item(index + stream * 10**12)
        epoch, pos = divmod(index, size)
        return self.train_source.item(self._perm(stream, epoch, size)[pos])

    def _perm(self, stream: int, epoch: int, size: int) -> list[int]:
        key = (stream, epoch)
        if key not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919 * stream)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != stream}  # one epoch per stream
            self._perms[key] = torch.randperm(size, generator=gen).tolist()
        return self._perms[key]

    def _rank(self) -> int:
        return self.trainer.global_rank if self._has_trainer() else 0

    def _world(self) -> int:
        return self.trainer.world_size if self._has_trainer() else 1

    def _has_trainer(self) -> bool:
        return getattr(self, "trainer", None) is not None


def _initial_state() -> tuple[int, int]:
    """(policy_version, rollout_step) before the module connects its own state."""
    return 0, 0


class _Stream:
    """A sized iterable whose items are made on demand, when Lightning asks for the next batch."""

    def __init__(self, length: int, make: Callable[[int], RolloutBatch]) -> None:
        self.length, self.make = length, make

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[RolloutBatch]:
        for i in range(self.length):
            yield self.make(i)
