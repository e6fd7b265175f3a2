"""RolloutDataModule on the tiny model: reward columns, dynamic sampling, its limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.data.prompts import ArithmeticSource
from capo_lightning.data.templates import get_template
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.rollout import SamplingConfig
from tests.helpers import make_trainer
from tests.integration.test_module import adamw

SEEN: dict[str, list] = {}


def odd_answers_vary(completions, answers, **columns):
    """Constant reward for prompts with an even answer; length-based (varied) for odd answers."""
    SEEN.setdefault("columns", []).append(sorted(columns))
    return [0.0 if int(a) % 2 == 0 else len(c) / 10.0 for c, a in zip(completions, answers)]


def constant_reward(completions, answers, **columns):
    return [1.0] * len(completions)


def connected(tiny_model_dir: Path, **kwargs) -> RolloutDataModule:
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)))
    module.configure_model()
    dm = RolloutDataModule(
        train_source=ArithmeticSource(seed=2, max_value=20),
        prompts_per_step=4,
        group_size=4,
        sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
        max_prompt_tokens=96,
        **kwargs,
    )
    dm.connect(module.engine, module.tokenizer)
    return dm


def groups_of(batch):
    return {int(g): batch.rewards[batch.group_ids == g].tolist() for g in batch.group_ids.unique()}


def test_reward_functions_receive_length_columns(tiny_model_dir: Path) -> None:
    SEEN.clear()
    dm = connected(tiny_model_dir, reward_fn=odd_answers_vary)
    batch = next(iter(dm.train_dataloader()))
    assert SEEN["columns"][0] == ["completion_tokens", "max_new_tokens", "truncated"]
    assert batch.num_completions == 16


def test_dynamic_sampling_keeps_only_groups_with_reward_variance(tiny_model_dir: Path) -> None:
    plain = next(iter(connected(tiny_model_dir, reward_fn=odd_answers_vary).train_dataloader()))
    assert any(max(r) == min(r) for r in groups_of(plain).values())  # without it: constant groups are in
    dm = connected(tiny_model_dir, reward_fn=odd_answers_vary, dynamic_sampling=True, max_sampling_rounds=8)
    batch = next(iter(dm.train_dataloader()))
    groups = groups_of(batch)
    assert len(groups) == 4 and batch.num_completions == 16
    assert all(max(r) > min(r) for r in groups.values())
    assert batch.stats["rollout/groups_filled"] == 0.0
    assert batch.stats["rollout/sampling_rounds"] >= 1
    assert batch.stats["rollout/groups_generated"] == 4 * batch.stats["rollout/sampling_rounds"]


def test_dynamic_sampling_stops_at_the_limit_and_the_run_continues(tiny_model_dir: Path) -> None:
    dm = RolloutDataModule(
        train_source=ArithmeticSource(seed=2, max_value=20),
        prompts_per_step=2,
        group_size=4,
        sampling=SamplingConfig(max_new_tokens=8),
        max_prompt_tokens=96,
        reward_fn=constant_reward,
        dynamic_sampling=True,
        max_sampling_rounds=3,
    )
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw)
    trainer = make_trainer(2)
    with pytest.warns(UserWarning, match="dynamic sampling found 0 of 2 groups"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert metrics["rollout/sampling_rounds"].item() == 3.0
    assert metrics["rollout/groups_filled"].item() == 2.0
    assert metrics["rollout/groups_kept_frac"].item() == 0.0
    assert metrics["rollout/frac_zero_std_groups"].item() == 1.0


def test_refill_prompts_are_deterministic_and_differ_from_training_prompts(tiny_model_dir: Path) -> None:
    a = connected(tiny_model_dir, dynamic_sampling=True)
    b = connected(tiny_model_dir, dynamic_sampling=True)
    refill = [a._refill_item(5, 1, j).prompt for j in range(4)]
    assert refill == [b._refill_item(5, 1, j).prompt for j in range(4)]
    # the refill stream is not the training stream replayed: step 5's training prompts differ
    assert refill != [a._train_item(5, j).prompt for j in range(4)]
    assert refill != [a._refill_item(5, 2, j).prompt for j in range(4)]  # nor is the next round


class _Ranked(RolloutDataModule):
    """A DataModule that believes it is ``rank`` of ``world`` (the real ranks run in test_invariance)."""

    def __init__(self, rank: int, world: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fixed = (rank, world)

    def _rank(self) -> int:
        return self.fixed[0]

    def _world(self) -> int:
        return self.fixed[1]


def test_eval_prompts_are_sharded_across_ranks_with_equal_batch_counts(tiny_model_dir: Path) -> None:
    source = ArithmeticSource(seed=5, max_value=20)
    seen, batches = [], []
    for rank in range(3):
        dm = _Ranked(rank, 3, val_source=source, val_prompts=7, val_batch_size=2, val_samples=2, max_prompt_tokens=96)
        module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)))
        module.configure_model()
        dm.connect(module.engine, module.tokenizer)
        stream = list(dm.val_dataloader())
        batches.append(len(stream))
        for batch in stream:
            valid = int(batch.stats["eval/valid_prompts"])
            prompts = batch.texts.prompts[:: dm.val_samples]
            seen += [p for p in prompts[:valid]]
            assert batch.stats["verifier/parse_fail_pred"] >= 0.0  # the math grader reported its health
    assert batches == [2, 2, 2]  # ceil(ceil(7 / 3) / 2): every rank runs the same number of batches
    expected = [dm.format_prompt(source.item(i).prompt) for i in range(7)]
    assert sorted(seen) == sorted(expected)  # each of the 7 prompts exactly once over all ranks


def test_training_batches_carry_verifier_stats(tiny_model_dir: Path) -> None:
    batch = next(iter(connected(tiny_model_dir).train_dataloader()))  # default reward: math_reward
    assert {"verifier/parse_fail_pred", "verifier/timeouts", "verifier/latency_ms_p95"} <= set(batch.stats)
    assert 0.0 <= batch.stats["verifier/parse_fail_pred"] <= 1.0


def test_train_and_eval_prompts_use_their_own_templates(tiny_model_dir: Path) -> None:
    source = ArithmeticSource(seed=5, max_value=20)
    dm = connected(tiny_model_dir, template="plain", eval_template="eval", val_source=source, val_prompts=1)
    dm.max_prompt_tokens = 512
    train = next(iter(dm.train_dataloader()))
    assert train.texts.prompts[0] == dm.train_source.item(0).prompt  # plain: the question as is
    val = next(iter(dm.val_dataloader()))
    assert "Solve the following math problem" in val.texts.prompts[0]
    assert val.texts.prompts[0] == get_template("eval").format(source.item(0).prompt, dm.tokenizer)
