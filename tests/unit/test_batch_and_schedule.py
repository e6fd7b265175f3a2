"""Collation layout, schedule values worked by hand, and the step plan."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from capo_lightning.data.collate import collate_completions
from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.data.prompts import JsonlSource
from capo_lightning.rollout import Completion
from capo_lightning.training.optim import WarmupCosineLR
from capo_lightning.training.plan import plan_step
from capo_lightning.training.schedules import SCHEDULES, Schedule, choose


def test_collate_left_pads_prompts_and_right_pads_responses() -> None:
    comps = [
        Completion(prompt_ids=[5, 6, 7], token_ids=[8, 2], logprobs=[-0.1, -0.2], finish_reason="stop", text="a"),
        Completion(
            prompt_ids=[9], token_ids=[10, 11, 12], logprobs=[-1.0, -2.0, -3.0], finish_reason="length", text="b"
        ),
    ]
    b = collate_completions(comps, [1.0, 0.0], [0, 0], pad_id=0, policy_version=4)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 2, 0], [0, 0, 9, 10, 11, 12]]
    assert b.attention_mask.tolist() == [[True] * 5 + [False], [False, False, True, True, True, True]]
    assert b.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert b.prompt_len == 3 and b.responses.tolist() == [[8, 2, 0], [10, 11, 12]]
    torch.testing.assert_close(b.behavior_logprobs, torch.tensor([[-0.1, -0.2, 0.0], [-1.0, -2.0, -3.0]]))
    assert b.truncated.tolist() == [False, True]
    assert b.policy_version == 4
    sub = b.select(torch.tensor([1]))
    assert sub.input_ids.tolist() == [[0, 0, 9, 10, 11, 12]] and sub.texts is None


def test_rollout_batch_validate_rejects_bad_shapes() -> None:
    comps = [Completion([1], [2], [-0.5], "stop", "x")]
    b = collate_completions(comps, [0.0], [0], pad_id=0, policy_version=0)
    with pytest.raises(ValueError, match="rewards"):
        b.replace(rewards=torch.zeros(3)).validate()


def test_rollout_batch_is_an_immutable_leaf_that_precision_plugins_leave_alone() -> None:
    # Lightning's true-half plugins cast every float tensor apply_to_collection finds (and crash on frozen
    # dataclasses); the batch is neither walked nor cast, and moves itself
    import copy
    import pickle

    from lightning.pytorch.plugins.precision import HalfPrecision

    comps = [Completion([1, 2], [3, 4], [-0.5, -0.25], "stop", "x")]
    b = collate_completions(comps, [1.0], [0], pad_id=0, policy_version=3)
    out = HalfPrecision("bf16-true").convert_input(b)
    assert out is b and out.behavior_logprobs.dtype == out.rewards.dtype == torch.float32
    with pytest.raises(AttributeError, match="immutable"):
        b.rewards = torch.zeros(1)
    with pytest.raises(TypeError, match="no field"):
        b.replace(reward=torch.zeros(1))
    for twin in (pickle.loads(pickle.dumps(b)), copy.deepcopy(b), b.to("cpu")):
        assert torch.equal(twin.input_ids, b.input_ids) and twin.policy_version == 3
        assert torch.equal(twin.behavior_logprobs, b.behavior_logprobs)


def test_warmup_cosine_values_worked_by_hand() -> None:
    # base lr 1.0, 10 steps, warmup ratio 0.2 -> 2 warmup steps: factors 1/3, 2/3;
    # then cosine over the remaining 8 steps: step 2 -> 1.0, step 6 -> 0.5 * (1 + cos(pi/2)) = 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_ratio=0.2)
    assert sched.factor(0) == 1.0  # total unknown yet: flat
    sched.set_total_steps(10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 3)
    assert [round(sched.factor(s), 6) for s in (0, 1, 2, 6)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.5]
    assert sched.factor(10) == pytest.approx(0.0)
    floor = WarmupCosineLR(opt, warmup_ratio=0.0, total_steps=4, min_lr_ratio=0.1)
    assert floor.factor(4) == pytest.approx(0.1)
    assert floor.factor(2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_plan_requires_minibatches_to_divide_the_step() -> None:
    with pytest.raises(ValueError, match="model.minibatches"):
        plan_step(10, 1, 3, None)
    plan = plan_step(8, 2, 2, 3)
    assert not plan.single_update
    rows = plan.minibatch_rows(1)
    assert sorted(torch.cat(rows).tolist()) == list(range(8))  # a permutation of every row
    assert [len(r) for r in plan.micro_rows(rows[0])] == [3, 1]
    assert plan_step(8, 1, 1, None).single_update and plan_step(8, 1, 1, 2).single_update


def test_prompt_order_is_a_pure_function_of_step(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "answer": "{i}"}}\n' for i in range(5)))
    a = RolloutDataModule(train_source=JsonlSource(str(path)), prompts_per_step=2, seed=3)
    b = RolloutDataModule(train_source=JsonlSource(str(path)), prompts_per_step=2, seed=3)
    firsts = [[a._train_item(step, j).prompt for j in range(2)] for step in range(5)]
    assert firsts == [[b._train_item(step, j).prompt for j in range(2)] for step in reversed(range(5))][::-1]
    # 5 steps x 2 prompts = 2 epochs of 5 prompts: each epoch is a permutation of the file
    flat = [p for pair in firsts for p in pair]
    assert sorted(flat[:5]) == [f"q{i}" for i in range(5)] and sorted(flat[5:]) == [f"q{i}" for i in range(5)]


def test_micro_batches_group_rows_of_similar_length() -> None:
    """With row lengths, micro-batches take the longest rows first (each pads only to its own longest row);
    every row is used exactly once, and without lengths the order is unchanged."""
    plan = plan_step(6, 1, 1, 2)
    lengths = torch.tensor([5, 9, 1, 7, 9, 3])
    chunks = plan.chunks(6, lengths)
    assert [c.tolist() for c in chunks] == [[1, 4], [3, 0], [5, 2]]  # stable among equal lengths
    assert [c.tolist() for c in plan.chunks(6)] == [[0, 1], [2, 3], [4, 5]]
    assert [c.tolist() for c in plan.micro_rows(torch.tensor([2, 0, 3]), lengths)] == [[3, 0], [2]]
    assert [c.tolist() for c in plan_step(6, 1, 1, None).chunks(6, lengths)] == [list(range(6))]  # one micro-batch


class _Declares:
    """Only what ``choose`` reads of a selector: whether it needs a forward and whether it streams."""

    def __init__(self, needs_forward: bool, streams: bool) -> None:
        self.needs_forward, self.streams = needs_forward, streams


@pytest.mark.parametrize(
    ("epochs", "minibatches", "micro", "selector", "expected"),
    [
        (1, 1, None, None, Schedule.MASK_FIRST),
        (1, 1, 2, _Declares(needs_forward=False, streams=False), Schedule.MASK_FIRST),
        (1, 1, None, _Declares(needs_forward=True, streams=True), Schedule.ONE_FORWARD),
        (1, 1, 8, _Declares(needs_forward=True, streams=False), Schedule.ONE_FORWARD),
        (1, 1, 2, _Declares(needs_forward=True, streams=False), Schedule.LOOK_AHEAD),
        (1, 1, 2, _Declares(needs_forward=True, streams=True), Schedule.STREAMING),
        (2, 1, None, _Declares(needs_forward=True, streams=True), Schedule.MULTI_PASS),
        (1, 2, None, None, Schedule.MULTI_PASS),
    ],
)
def test_the_schedule_is_named_from_the_plan_and_what_the_selector_declares(
    epochs, minibatches, micro, selector, expected
) -> None:
    assert choose(plan_step(8, epochs, minibatches, micro), selector) is expected


def test_every_schedule_is_a_function_of_at_most_40_lines_without_flags() -> None:
    assert set(SCHEDULES) == set(Schedule)
    for schedule, function in SCHEDULES.items():
        lines, _ = inspect.getsourcelines(function)
        assert len(lines) <= 40, (schedule, len(lines))
        parameters = inspect.signature(function).parameters
        assert list(parameters) == ["ctx", "batch", "adv", "ref", "plan"], schedule
        assert not any(p.annotation in (bool, "bool") for p in parameters.values()), schedule
