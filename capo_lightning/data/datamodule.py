"""The DataModule that streams freshly generated, scored rollouts: the Lightning-facing side.

It owns the data settings, the prompt order, the rank arithmetic and the dataloaders; the work of
turning prompts into a batch is :mod:`capo_lightning.data.rollout`'s. The module talks to it
through one call, :meth:`RolloutDataModule.connect`, which returns the :class:`EvalSpec` that
evaluation needs; the step's own data (its token budget, stats) travels on the RolloutBatch. The
data position (which batch comes next) is the DataModule's own and lives in its checkpoint entry
(:class:`~capo_lightning.data.position.TrainPosition`).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from lightning import LightningDataModule

from capo_lightning.batch import RolloutBatch
from capo_lightning.data.eval_sets import (
    EvalSpec,
    default_val_sampling,
    warn_if_greedy_with_samples,
)
from capo_lightning.data.eval_streams import EvalStreams
from capo_lightning.data.order import PromptOrder
from capo_lightning.data.position import TrainPosition
from capo_lightning.data.prompts import ArithmeticSource, PromptItem, PromptSource
from capo_lightning.data.rollout import (
    RolloutMaker,
    RolloutStream,
    Sampled,
    ScoredGroup,
    check_token_budget,
    keep_varied_groups,
)
from capo_lightning.data.templates import PromptTemplate, get_template
from capo_lightning.rewards.base import RewardFn, pop_stats
from capo_lightning.rewards.math import math_reward
from capo_lightning.rollout.engine import RolloutEngine, SamplingConfig

__all__ = ["RolloutDataModule", "RolloutStream"]


class RolloutDataModule(EvalStreams, LightningDataModule):
    """Streams rollout batches: B prompts, G completions each, scored by a reward function.

    The train stream is *sized* (``steps_per_epoch``), so Lightning does not prefetch: batch k is
    generated only after step k-1 updated the weights (staleness 0). Prompts of rollout step k are a
    pure function of (seed, k, rank), so resuming at step k replays exactly the prompts it would
    have seen (:class:`~capo_lightning.data.order.PromptOrder`). Generation and scoring happen in
    :class:`~capo_lightning.data.rollout.RolloutMaker`, with the engine and tokenizer that the
    module attaches through :meth:`connect`.

    Which batch comes next is this DataModule's: it counts the training batches it hands out
    (:attr:`position`) and Lightning saves the count with :meth:`state_dict` under the class's name
    in the checkpoint. The policy version a batch is sampled with is the Trainer's ``global_step``
    (optimizer steps done, restored by Lightning's loop state), read when the batch is made.

    Args:
        train_source: where training prompts come from.
        val_source: prompts for validation, or a list of sources, each logged under its own name
            (``val/<name>/accuracy``, see :class:`EvalSpec`); None disables validation.
        test_source: prompts for ``capo test`` (a source or a list); None uses ``val_source``.
        prompts_per_step: B, prompts per optimizer step per rank.
        group_size: G, completions sampled per prompt.
        sampling: how training completions are sampled.
        val_sampling: how validation completions are sampled (default: temperature 0.6, top_p 0.95).
        val_samples: completions per validation prompt (n of pass@k; k <= n).
        val_prompts: how many prompts of each validation source to use (its first ones).
        val_batch_size: validation prompts per generation batch.
        reward_fn: ``reward(completions, answers, **columns) -> list[float]`` for training. If it
            has a ``pop_stats()`` method (the math rewards do), its stats are logged with each
            batch.
        eval_reward_fn: the correctness grader of validation and test (1.0 = correct); keep it
            unshaped.
        template: prompt template name (:mod:`capo_lightning.data.templates`: ``chat``, ``paper``,
            ``eval``, ``qwen_math``, ``plain``).
        system_prompt: replaces the template's system message.
        eval_template: template of validation and test prompts; None = ``template``. The paper
            trains with ``paper`` and reports TEST accuracy with ``eval``.
        max_prompt_tokens: longest allowed formatted prompt, in tokens.
        steps_per_epoch: length of one pass of the train stream (an epoch is bookkeeping only).
        seed: seeds prompt order and sampling; None = the run's ``seed_everything`` (the ``capo``
            command fills it, so seeds are real replicates), 0 outside the command.
        dynamic_sampling: DAPO's dynamic sampling: drop groups whose rewards all agree and refill
            with fresh prompts until B varied groups are found; every rank runs the rounds the
            neediest rank needs, agreed after each round (``keep_varied_groups``).
        max_sampling_rounds: generation rounds per step at most, with dynamic sampling; then the
            batch is topped up with zero-variance groups and a warning is logged.
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
        seed: int | None = None,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 4,
    ) -> None:
        super().__init__()
        _require_positive(
            prompts_per_step=prompts_per_step,
            group_size=group_size,
            val_samples=val_samples,
            val_batch_size=val_batch_size,
            steps_per_epoch=steps_per_epoch,
            max_prompt_tokens=max_prompt_tokens,
            max_sampling_rounds=max_sampling_rounds,
        )
        seed = 0 if seed is None else seed
        self.train_source = (
            train_source if train_source is not None else ArithmeticSource(seed=seed)
        )
        self.val_source, self.test_source = val_source, test_source
        self.template = get_template(template)
        self.eval_template = self.template if eval_template is None else get_template(eval_template)
        self.prompts_per_step, self.group_size = prompts_per_step, group_size
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.val_sampling = (
            val_sampling if val_sampling is not None else default_val_sampling(self.sampling)
        )
        self.val_samples, self.val_prompts = val_samples, val_prompts
        self.val_batch_size = val_batch_size
        warn_if_greedy_with_samples(self.val_sampling, val_samples)
        self.reward_fn, self.eval_reward_fn = reward_fn, eval_reward_fn
        self.system_prompt, self.max_prompt_tokens = system_prompt, max_prompt_tokens
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self.dynamic_sampling, self.max_sampling_rounds = dynamic_sampling, max_sampling_rounds
        self.order = PromptOrder(self.train_source, seed, prompts_per_step, max_sampling_rounds)
        self.engine: RolloutEngine | None = None  # attached by connect()
        self.tokenizer: Any = None
        # the data position: training batches handed out (checkpointed)
        self.position = TrainPosition()

    # ---- wiring -------------------------------------------------------------------------------
    def connect(
        self, engine: RolloutEngine, tokenizer: Any, context_len: int | None = None
    ) -> EvalSpec:
        """Attach what exists only once the policy is built (CAPOModule's ``configure_model``).

        Args:
            engine: the module's rollout engine (already bound to the policy).
            tokenizer: the policy's tokenizer.
            context_len: the model's maximum sequence length, checked against prompt + response
                budget.

        Returns:
            What evaluation needs to know: the set names per stage and the samples per problem.
        """
        samplings = {"sampling": self.sampling, "val_sampling": self.val_sampling}
        check_token_budget(self.max_prompt_tokens, samplings, context_len)
        self.engine, self.tokenizer = engine, tokenizer
        self._maker().check_source(self.train_source, "data.train_source")
        return EvalSpec(
            tuple(self.eval_names("val")), tuple(self.eval_names("test")), self.val_samples
        )

    # ---- dataloaders --------------------------------------------------------------------------
    def train_dataloader(self) -> RolloutStream:
        """Sized stream of training rollout batches (no prefetch, staleness 0)."""
        return RolloutStream(self.steps_per_epoch, self._next_train_batch)

    # ---- batches ------------------------------------------------------------------------------
    def _next_train_batch(self, _: int) -> RolloutBatch:
        version, step = self._policy_version(), self.position.batches
        maker = self._maker()
        items = [self._train_item(step, j) for j in range(self.prompts_per_step)]
        sampling = replace(self.sampling, seed=self.seed * 1_000_003 + step * 7919 + self._rank())
        sampled = maker.sample(items, self.group_size, sampling, self.reward_fn)
        if self.dynamic_sampling:
            more = partial(self._refill_groups, maker, step, sampling)
            wanted, rounds = self.prompts_per_step, self.max_sampling_rounds
            kept = keep_varied_groups(sampled.groups, wanted, rounds, more, self._any_rank)
            sampled = Sampled(kept.groups, sampled.stats | kept.stats)
        stats = sampled.stats | pop_stats(self.reward_fn) | pop_stats(maker.engine)
        batch = maker.collate(sampled.groups, version, step, stats, sampling.max_new_tokens)
        self.position.handed_out(self._processed())
        return batch

    def _refill_groups(
        self, maker: RolloutMaker, step: int, sampling: SamplingConfig, round_: int
    ) -> list[ScoredGroup]:
        """Dynamic sampling's round ``round_`` (>= 1): fresh prompts, sampled with a seed of their
        own."""
        items = [self._refill_item(step, round_, j) for j in range(self.prompts_per_step)]
        extra = replace(sampling, seed=sampling.seed + 104_729 * round_)
        return maker.sample(items, self.group_size, extra, self.reward_fn).groups

    def rollout(
        self, items: list[PromptItem], n: int, sampling: SamplingConfig, version: int, step: int
    ) -> RolloutBatch:
        """Generate ``n`` completions per item, score them with ``reward_fn`` and collate a
        RolloutBatch."""
        maker = self._maker()
        sampled = maker.sample(items, n, sampling, self.reward_fn)
        return maker.collate(sampled.groups, version, step, sampled.stats, sampling.max_new_tokens)

    def format_prompt(self, question: str, template: PromptTemplate | None = None) -> str:
        """``question`` formatted by ``template`` (default ``data.template``); raises past
        max_prompt_tokens."""
        return self._maker().format_prompt(question, template)

    def _maker(self) -> RolloutMaker:
        """A RolloutMaker with the connected engine and the current prompt settings."""
        if self.engine is None:
            raise RuntimeError(
                "RolloutDataModule used before connect(); the CAPOModule connects it in "
                "configure_model()"
            )
        return RolloutMaker(
            self.engine, self.tokenizer, self.template, self.system_prompt, self.max_prompt_tokens
        )

    # ---- the data position in checkpoints ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves under this class's name: the training batches trained on
        (:class:`TrainPosition`)."""
        return {"train_batches": self.position.trained(self._processed())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream after the ``train_batches`` a checkpoint counted."""
        self.position.restart(int(state_dict["train_batches"]))

    def restore_legacy_position(self, checkpoint: dict[str, Any], trained_batches: int) -> None:
        """Take the position of a checkpoint written before this DataModule kept its own.

        Such a checkpoint has no entry under this class's name, only the module's count of the
        batches trained on (``capo_state["rollout_step"]``), which the module hands over as
        ``trained_batches`` from its ``on_load_checkpoint``. A checkpoint with the entry is left
        alone: Lightning restores it through :meth:`load_state_dict`, after the module's hook in
        ``fit``/``validate``/``test`` and before it in ``_CheckpointConnector.restore``, so acting
        only on its absence makes that order irrelevant.
        """
        if type(self).__qualname__ not in checkpoint:
            self.load_state_dict({"train_batches": trained_batches})

    def setup(self, stage: str) -> None:
        """A Trainer run starts: its progress counts start afresh; the batches handed out so far
        stand."""
        self.position.new_run()

    def _processed(self) -> int | None:
        """The Trainer's count of processed training batches (Lightning's own restart record); None
        without one."""
        if not self._has_trainer():
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _policy_version(self) -> int:
        """Optimizer steps done (the Trainer's ``global_step``): the weights a batch made now is
        sampled with."""
        return self.trainer.global_step if self._has_trainer() else 0

    # ---- prompts and ranks --------------------------------------------------------------------
    def _train_item(self, step: int, j: int) -> PromptItem:
        """Prompt j of rollout step ``step`` on this rank: a pure function of (seed, step, rank,
        j)."""
        return self.order.train_item(step, j, self._rank(), self._world())

    def _refill_item(self, step: int, round_: int, j: int) -> PromptItem:
        """Prompt j of dynamic-sampling round ``round_`` (>= 1): drawn from a separate, seeded
        stream."""
        return self.order.refill_item(step, round_, j, self._rank(), self._world())

    def _rank(self) -> int:
        return self.trainer.global_rank if self._has_trainer() else 0

    def _world(self) -> int:
        return self.trainer.world_size if self._has_trainer() else 1

    def _any_rank(self, decision: bool) -> bool:
        """True when ``decision`` is True on any rank: one all-reduce (none in one process)."""
        if self._world() == 1:
            return decision
        return self.trainer.strategy.reduce_boolean_decision(decision, all=False)

    def _has_trainer(self) -> bool:
        return getattr(self, "trainer", None) is not None


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"data.{name} must be >= 1, got {value}")
