"""The DataModule that streams freshly generated, scored rollouts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import lightning as L
import torch

from capo_lightning.batch import RolloutBatch
from capo_lightning.data.collate import collate_completions
from capo_lightning.data.prompts import ArithmeticSource, PromptItem, PromptSource
from capo_lightning.rewards.math import math_reward
from capo_lightning.rollout.engine import RolloutEngine, SamplingConfig

RewardFn = Callable[..., list[float]]


class RolloutDataModule(L.LightningDataModule):
    """Streams rollout batches: B prompts, G completions each, scored by a reward function.

    The train stream is *sized* (``steps_per_epoch``), so Lightning does not prefetch: batch k is
    generated only after step k-1 updated the weights (staleness 0). Prompts of rollout step k are a
    pure function of (seed, k, rank), so resuming at step k replays exactly the prompts it would
    have seen. The module connects the engine and tokenizer in its ``setup`` (see :meth:`connect`).

    Args:
        train_source: where training prompts come from.
        val_source: prompts for validation; None disables validation.
        test_source: prompts for ``capo test``; None uses ``val_source``.
        prompts_per_step: B, prompts per optimizer step per rank.
        group_size: G, completions sampled per prompt.
        sampling: how training completions are sampled.
        val_sampling: how validation completions are sampled (default: temperature 0.6, top_p 0.95).
        val_samples: completions per validation prompt.
        val_prompts: how many validation prompts to use (the first ones of ``val_source``).
        val_batch_size: validation prompts per generation batch.
        reward_fn: ``reward(completions, answers, **columns) -> list[float]``.
        system_prompt: optional system message placed before each prompt.
        use_chat_template: format prompts with the tokenizer's chat template.
        max_prompt_tokens: longest allowed formatted prompt, in tokens.
        steps_per_epoch: length of one pass of the train stream (an epoch is bookkeeping only).
        seed: seeds prompt order and sampling.
    """

    def __init__(
        self,
        train_source: PromptSource | None = None,
        val_source: PromptSource | None = None,
        test_source: PromptSource | None = None,
        prompts_per_step: int = 4,
        group_size: int = 8,
        sampling: SamplingConfig | None = None,
        val_sampling: SamplingConfig | None = None,
        val_samples: int = 1,
        val_prompts: int = 32,
        val_batch_size: int = 16,
        reward_fn: RewardFn = math_reward,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        max_prompt_tokens: int = 512,
        steps_per_epoch: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("prompts_per_step", prompts_per_step), ("group_size", group_size),
                            ("val_samples", val_samples), ("val_batch_size", val_batch_size),
                            ("steps_per_epoch", steps_per_epoch), ("max_prompt_tokens", max_prompt_tokens)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        self.train_source = train_source if train_source is not None else ArithmeticSource(seed=seed)
        self.val_source = val_source
        self.test_source = test_source
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.val_sampling = val_sampling if val_sampling is not None else SamplingConfig(
            max_new_tokens=self.sampling.max_new_tokens, temperature=0.6, top_p=0.95, top_k=0
        )
        self.val_samples = val_samples
        self.val_prompts = val_prompts
        self.val_batch_size = val_batch_size
        self.reward_fn = reward_fn
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self.max_prompt_tokens = max_prompt_tokens
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.engine: RolloutEngine | None = None
        self.tokenizer: Any = None
        self._state_fn: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._perms: dict[int, list[int]] = {}

    # ---- wiring -------------------------------------------------------------------------------
    def connect(self, engine: RolloutEngine, tokenizer: Any, state_fn: Callable[[], tuple[int, int]],
                context_len: int | None = None) -> None:
        """Attach what exists only once the policy is built.

        Args:
            engine: the module's rollout engine (already bound to the policy).
            tokenizer: the policy's tokenizer.
            state_fn: returns (policy_version, rollout_step) at generation time.
            context_len: the model's maximum sequence length, checked against prompt + response budget.
        """
        self.engine, self.tokenizer, self._state_fn = engine, tokenizer, state_fn
        budget = self.max_prompt_tokens + self.sampling.max_new_tokens
        if context_len is not None and budget > context_len:
            raise ValueError(
                f"data.max_prompt_tokens ({self.max_prompt_tokens}) + data.sampling.max_new_tokens "
                f"({self.sampling.max_new_tokens}) = {budget} exceeds the model's context of {context_len} tokens; "
                "lower one of them"
            )

    # ---- dataloaders --------------------------------------------------------------------------
    def train_dataloader(self) -> _Stream:
        """Sized stream of training rollout batches (no prefetch, staleness 0)."""
        return _Stream(self.steps_per_epoch, self._next_train_batch)

    def val_dataloader(self) -> _Stream | list:
        """Sized stream of validation batches, generated with the current weights when iterated."""
        return self._eval_stream(self.val_source)

    def test_dataloader(self) -> _Stream | list:
        """Like validation, on ``test_source`` (falls back to ``val_source``)."""
        return self._eval_stream(self.test_source if self.test_source is not None else self.val_source)

    def _eval_stream(self, source: PromptSource | None) -> _Stream | list:
        if source is None:
            return []
        count = self.val_prompts if source.size is None else min(self.val_prompts, source.size)
        chunks = [list(range(s, min(s + self.val_batch_size, count))) for s in range(0, count, self.val_batch_size)]
        return _Stream(len(chunks), lambda i: self._eval_batch(source, chunks[i]))

    # ---- batch construction -------------------------------------------------------------------
    def _next_train_batch(self, _: int) -> RolloutBatch:
        version, step = self._state_fn()
        items = [self._train_item(step, j) for j in range(self.prompts_per_step)]
        sampling = replace(self.sampling, seed=self.seed * 1_000_003 + step * 7919 + self._rank())
        return self.rollout(items, self.group_size, sampling, version, step)

    def _eval_batch(self, source: PromptSource, indices: list[int]) -> RolloutBatch:
        version, step = self._state_fn()
        items = [source.item(i) for i in indices]
        sampling = replace(self.val_sampling, seed=self.seed + 17 * indices[0])
        return self.rollout(items, self.val_samples, sampling, version, step)

    def rollout(self, items: list[PromptItem], n: int, sampling: SamplingConfig, version: int, step: int) -> RolloutBatch:
        """Generate ``n`` completions per item, score them and collate a RolloutBatch."""
        if self.engine is None:
            raise RuntimeError("RolloutDataModule used before connect(); the CAPOModule connects it in setup()")
        prompts = [self.format_prompt(item.prompt) for item in items]
        t0 = time.perf_counter()
        completions = self.engine.generate(prompts, n, sampling)
        gen_s = time.perf_counter() - t0
        answers = [item.answer for item in items for _ in range(n)]
        texts = [c.text for c in completions]
        t1 = time.perf_counter()
        rewards = self._score(texts, answers, [item.columns for item in items for _ in range(n)])
        reward_s = time.perf_counter() - t1
        group_ids = [j for j in range(len(items)) for _ in range(n)]
        batch = collate_completions(
            completions, rewards, group_ids, pad_id=self.tokenizer.pad_token_id, policy_version=version,
            rollout_step=step, prompts=[p for p in prompts for _ in range(n)], answers=answers,
        )
        tokens = float(batch.response_mask.sum())
        batch.stats.update({"time/generate_s": gen_s, "time/reward_s": reward_s,
                            "rollout/tokens_per_s": tokens / max(gen_s, 1e-9)})
        return batch

    def format_prompt(self, question: str) -> str:
        """Apply the system prompt and chat template; raise if the result exceeds max_prompt_tokens."""
        text = question
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": question})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        elif self.system_prompt:
            text = f"{self.system_prompt}\n\n{question}"
        num = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if num > self.max_prompt_tokens:
            raise ValueError(
                f"a prompt has {num} tokens after formatting, more than data.max_prompt_tokens="
                f"{self.max_prompt_tokens}: {question[:80]!r}... Raise data.max_prompt_tokens (prompt + "
                "max_new_tokens must fit the model's context) or remove long prompts from the source"
            )
        return text

    def _score(self, texts: list[str], answers: list[str], columns: list[dict[str, Any]]) -> list[float]:
        keys = sorted(set().union(*columns)) if columns else []
        cols = {k: [c.get(k) for c in columns] for k in keys}
        rewards = [float(r) for r in self.reward_fn(texts, answers, **cols)]
        name = getattr(self.reward_fn, "__name__", repr(self.reward_fn))
        if len(rewards) != len(texts):
            raise ValueError(f"data.reward_fn {name} returned {len(rewards)} rewards for {len(texts)} completions")
        if not all(math.isfinite(r) for r in rewards):
            raise ValueError(f"data.reward_fn {name} returned a non-finite reward: {rewards}")
        return rewards

    def _train_item(self, step: int, j: int) -> PromptItem:
        world, rank = self._world(), self._rank()
        index = (step * world + rank) * self.prompts_per_step + j
        size = self.train_source.size
        if size is None:
            return self.train_source.item(index)
        epoch, pos = divmod(index, size)
        return self.train_source.item(self._perm(epoch, size)[pos])

    def _perm(self, epoch: int, size: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(size, generator=gen).tolist()}  # keep one epoch cached
        return self._perms[epoch]

    def _rank(self) -> int:
        return self.trainer.global_rank if self._has_trainer() else 0

    def _world(self) -> int:
        return self.trainer.world_size if self._has_trainer() else 1

    def _has_trainer(self) -> bool:
        return getattr(self, "trainer", None) is not None


class _Stream:
    """A sized iterable whose items are made on demand, when Lightning asks for the next batch."""

    def __init__(self, length: int, make: Callable[[int], RolloutBatch]) -> None:
        self.length, self.make = length, make

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[RolloutBatch]:
        for i in range(self.length):
            yield self.make(i)
