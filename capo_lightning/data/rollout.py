"""Prompts in, a RolloutBatch out: format, generate, score, collate (and DAPO's dynamic sampling).

Nothing here knows about Lightning or ranks: :class:`RolloutMaker` is handed prompt items and
returns a batch; which items, and when, is the DataModule's business (and so is the agreement over
ranks that dynamic sampling is handed as a callable).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.data.collate import collate_completions
from capo_lightning.data.prompts import PromptItem, PromptSource
from capo_lightning.data.templates import PromptTemplate
from capo_lightning.faults import inject
from capo_lightning.rewards.base import RewardFn
from capo_lightning.rollout.engine import Completion, RolloutEngine, SamplingConfig


@dataclass
class ScoredGroup:
    """The G scored completions of one prompt."""

    item: PromptItem
    prompt: str  # formatted
    completions: list[Completion]
    rewards: list[float]
    # a reward was NaN (the grader failed): rewards 0, masked out of the loss
    ungraded: bool = False

    def varies(self, tol: float = 1e-6) -> bool:
        """True when the rewards differ (max - min > tol), i.e. the group has a learning signal."""
        return max(self.rewards) - min(self.rewards) > tol


@dataclass
class Sampled:
    """Scored groups of one generation round and what the round measured (``time/*``,
    ``rollout/*``)."""

    groups: list[ScoredGroup]
    stats: dict[str, float]


class RolloutMaker:
    """Turns prompt items into scored groups and RolloutBatches with one engine and one tokenizer.

    Args:
        engine: the rollout engine, bound to the policy.
        tokenizer: the policy's tokenizer (templates and the prompt-length check use it).
        template: the default prompt template.
        system_prompt: replaces the template's system message, if given.
        max_prompt_tokens: longest allowed formatted prompt, in tokens.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        template: PromptTemplate,
        system_prompt: str | None,
        max_prompt_tokens: int,
    ) -> None:
        self.engine, self.tokenizer, self.template = engine, tokenizer, template
        self.system_prompt, self.max_prompt_tokens = system_prompt, max_prompt_tokens

    def format_prompt(self, question: str, template: PromptTemplate | None = None) -> str:
        """Apply ``template`` (default: this maker's); raise if the result exceeds
        max_prompt_tokens."""
        text = self.format_prompt_unchecked(question, template)
        num = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if num > self.max_prompt_tokens:
            raise ValueError(
                f"a prompt has {num} tokens after formatting, more than "
                f"data.max_prompt_tokens={self.max_prompt_tokens}: {question[:80]!r}... Raise "
                "data.max_prompt_tokens (prompt + max_new_tokens must fit the model's context) or "
                "remove long prompts from the source"
            )
        return text

    def check_source(self, source: PromptSource, field: str) -> None:
        """Format every prompt of a finite ``source`` now, so one over ``max_prompt_tokens`` stops
        the run before it trains, naming its indices, not at the step that first draws it (an
        unbounded source is checked prompt by prompt as its steps draw them)."""
        if source.size is None:
            return
        texts = [self.format_prompt_unchecked(source.item(i).prompt) for i in range(source.size)]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        over = [(i, n) for i, n in enumerate(lengths) if n > self.max_prompt_tokens]
        if over:
            shown = ", ".join(f"item {i} ({n} tokens)" for i, n in over[:5])
            raise ValueError(
                f"{field} ({source.name()}): {len(over)} of {source.size} prompts are longer than "
                f"data.max_prompt_tokens={self.max_prompt_tokens} once formatted: {shown}"
                f"{' ...' if len(over) > 5 else ''}. Raise data.max_prompt_tokens (prompt + "
                "max_new_tokens must fit the model's context) or remove them from the source"
            )

    def format_prompt_unchecked(self, question: str, template: PromptTemplate | None = None) -> str:
        """``question`` formatted by ``template`` (default: this maker's), length unchecked."""
        return (template or self.template).format(question, self.tokenizer, self.system_prompt)

    def sample(
        self,
        items: list[PromptItem],
        n: int,
        sampling: SamplingConfig,
        reward_fn: RewardFn,
        template: PromptTemplate | None = None,
    ) -> Sampled:
        """Generate ``n`` completions per item and score them with ``reward_fn``."""
        prompts = [self.format_prompt(item.prompt, template) for item in items]
        t0 = time.perf_counter()
        inject("generation")
        completions = self.engine.generate(prompts, n, sampling)
        gen_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        items_n = [item for item in items for _ in range(n)]
        inject("grading")
        rewards = compute_rewards(reward_fn, completions, items_n, sampling.max_new_tokens)
        reward_s = time.perf_counter() - t1
        groups = [
            _scored(item, prompt, completions[j * n : (j + 1) * n], rewards[j * n : (j + 1) * n])
            for j, (item, prompt) in enumerate(zip(items, prompts))
        ]
        tokens = sum(len(c.token_ids) for c in completions)
        stats = {
            keys.TIME_GENERATE: gen_s,
            keys.TIME_REWARD: reward_s,
            keys.TOKENS_PER_S: tokens / max(gen_s, 1e-9),
            keys.UNGRADED_GROUPS: float(sum(g.ungraded for g in groups)),
        }
        return Sampled(groups, stats)

    def collate(
        self, groups: list[ScoredGroup], version: int, step: int, stats: dict, max_new_tokens: int
    ) -> RolloutBatch:
        """Stack the groups into one RolloutBatch carrying ``stats`` and its token budget."""
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
            max_new_tokens=max_new_tokens,
        )
        for j, group in enumerate(groups):
            if group.ungraded:  # nothing learnt from it, no token counted
                batch.response_mask[j * n : (j + 1) * n] = False
        batch.stats.update(stats)
        return batch


def _scored(item: PromptItem, prompt: str, completions: list[Completion], rewards: list[float]):
    """A ScoredGroup; one with an ungraded (NaN) reward is kept for the batch's shape but marked:
    rewards 0 (no variance: dynamic sampling replaces it) and, once collated, no loss tokens.
    Dropping the group, not scoring the answer 0, keeps a correct answer from being taught as
    wrong."""
    if any(math.isnan(r) for r in rewards):
        return ScoredGroup(item, prompt, completions, [0.0] * len(rewards), ungraded=True)
    return ScoredGroup(item, prompt, completions, rewards)


def compute_rewards(
    reward_fn: RewardFn, completions: list[Completion], items: list[PromptItem], max_new_tokens: int
) -> list[float]:
    """Call ``reward_fn`` with each item's columns plus ``completion_tokens``, ``truncated`` and
    ``max_new_tokens`` (what length-aware rewards such as OverlongPenalty read), and check its
    answer."""
    texts = [c.text for c in completions]
    keys = sorted(set().union(*(item.columns for item in items)))
    cols: dict[str, list[Any]] = {k: [item.columns.get(k) for item in items] for k in keys}
    cols["completion_tokens"] = [len(c.token_ids) for c in completions]
    cols["truncated"] = [c.finish_reason == "length" for c in completions]
    cols["max_new_tokens"] = [max_new_tokens] * len(completions)
    rewards = [float(r) for r in reward_fn(texts, [item.answer for item in items], **cols)]
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    if len(rewards) != len(texts):
        raise ValueError(
            f"data.reward_fn {name} returned {len(rewards)} rewards for {len(texts)} completions"
        )
    if any(math.isinf(r) for r in rewards):  # NaN: could not grade (its group is dropped)
        raise ValueError(f"data.reward_fn {name} returned an infinite reward: {rewards}")
    return rewards


def keep_varied_groups(
    groups: list[ScoredGroup],
    wanted: int,
    max_rounds: int,
    more: Callable[[int], list[ScoredGroup]],
    any_rank: Callable[[bool], bool] | None = None,
) -> Sampled:
    """DAPO's dynamic sampling: keep groups whose rewards differ; refill with fresh prompts.

    At most ``max_rounds`` generation rounds (the first one made ``groups``; ``more(round_)`` makes
    round 1, 2, ...). If ``wanted`` varied groups are still missing, the batch is topped up with
    zero-variance groups (advantage 0, no gradient) so every rank keeps exactly ``wanted`` groups,
    and a warning says so.

    The number of rounds is agreed over ranks, because under FSDP2 with the HF engine every round
    is collective calls (``generate`` runs on the sharded policy): after each round that leaves
    rounds to spare, ``any_rank(this rank still needs more)`` says whether any rank does, and if so
    every rank runs the next round. So every rank runs the rounds the neediest rank needs; a rank
    that already has ``wanted`` varied groups samples its round and discards it. Each rank keeps its
    first ``wanted`` varied groups in round order, then its first zero-variance groups in round
    order as top-up, so a rank's batch is what it would be had it decided alone. ``any_rank`` is
    one all-reduce (``reduce_boolean_decision(..., all=False)`` of the trainer's strategy); None, in
    one process, is this rank's own answer: no collective.
    """
    agree = any_rank if any_rank is not None else bool
    kept = [g for g in groups if g.varies()]
    dropped = [g for g in groups if not g.varies()]
    generated, rounds = len(groups), 1
    while rounds < max_rounds and agree(len(kept) < wanted):
        fresh = more(rounds)
        kept += [g for g in fresh if g.varies()]
        dropped += [g for g in fresh if not g.varies()]
        generated, rounds = generated + len(fresh), rounds + 1
    filled = max(0, wanted - len(kept))
    if filled:
        rank_zero_warn(
            f"capo: dynamic sampling found {len(kept)} of {wanted} groups with varied rewards in "
            f"{rounds} rounds (data.max_sampling_rounds); {filled} zero-variance groups fill the "
            "batch"
        )
    stats = {
        keys.SAMPLING_ROUNDS: float(rounds),
        keys.GROUPS_GENERATED: float(generated),
        keys.GROUPS_KEPT_FRAC: len(kept) / generated,
        keys.GROUPS_FILLED: float(filled),
    }
    return Sampled((kept + dropped[:filled])[:wanted], stats)


class RolloutStream:
    """A sized iterable whose batches are made on demand, when Lightning asks for the next one."""

    def __init__(self, length: int, make: Callable[[int], RolloutBatch]) -> None:
        self.length, self.make = length, make

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[RolloutBatch]:
        for i in range(self.length):
            yield self.make(i)


def check_token_budget(
    max_prompt_tokens: int, samplings: dict[str, SamplingConfig], context_len: int | None
) -> None:
    """Refuse a prompt budget plus a response budget (``data.<name>.max_new_tokens`` of each
    sampling) longer than the model's context; ``context_len`` None checks nothing."""
    for name, sampling in samplings.items():
        budget = max_prompt_tokens + sampling.max_new_tokens
        if context_len is not None and budget > context_len:
            raise ValueError(
                f"data.max_prompt_tokens ({max_prompt_tokens}) + "
                f"data.{name}.max_new_tokens ({sampling.max_new_tokens}) = {budget} exceeds "
                f"the model's context of {context_len} tokens; lower one of them"
            )
