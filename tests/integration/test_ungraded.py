"""A grader that dies mid-batch: the run goes on, the count is logged, and nothing false is taught.

- the real grading pool, its server killed at its 2nd symbolic comparison (``CAPO_FAULT=grader:2:kill``, read by
  the server process): the comparison it died on and the rest of its request come back ``error``, and MathReward
  scores them NaN (ungraded), not 0; ``verifier/errors`` counts them; the next call runs on a new server.
  Before, they scored 0: a correct answer graded 0 gets a negative advantage in its group.
- the rollout: a group with an ungraded reward is kept for the batch's shape, its rewards set to 0 (no variance:
  DAPO's dynamic sampling replaces it) and its completions' tokens masked out of the loss; counted in
  ``rollout/ungraded_groups``. The reward function that returns NaN for one completion stands in for MathReward
  after a grader death (which the first test shows), on the tiny model's real completions.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from capo_lightning import keys
from capo_lightning.data.prompts import PromptItem
from capo_lightning.data.rollout import RolloutMaker
from capo_lightning.data.templates import PromptTemplate
from capo_lightning.faults import VARIABLE
from capo_lightning.models.policy import PolicySpec, load_policy
from capo_lightning.rewards import MathReward
from capo_lightning.rollout import HFEngine, SamplingConfig

# symbolic pairs (no quick verdict): each one goes to the grading server
COMPLETIONS = ["so \\boxed{2x}", "so \\boxed{x^2}", "so \\boxed{3y}"]
ANSWERS = ["x+x", "x*x", "y+y+y"]


def test_a_grader_killed_mid_batch_leaves_its_answers_ungraded_not_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "grader:2:kill")
    reward = MathReward(timeout_s=5.0, workers=1)
    try:
        got = reward(COMPLETIONS, ANSWERS)
        assert sum(r == 1.0 for r in got) == 1 and sum(math.isnan(r) for r in got) == 2, got
        assert reward.pop_stats()[keys.VERIFIER_ERRORS] == 2.0
        # the pool replaced the dead server (which inherits the fault, so dies at its 2nd comparison again)
        again = reward(COMPLETIONS, ANSWERS)
        assert sum(r == 1.0 for r in again) == 1 and sum(math.isnan(r) for r in again) == 2, again
    finally:
        reward.close()


def test_a_group_with_an_ungraded_answer_is_dropped_from_the_loss(tiny_model_dir: Path) -> None:
    policy, tokenizer = load_policy(PolicySpec(str(tiny_model_dir)))
    engine = HFEngine()
    engine.bind(policy, tokenizer)
    maker = RolloutMaker(engine, tokenizer, PromptTemplate("plain", chat=False), None, max_prompt_tokens=64)

    def grader_failed_on_the_second(completions: list[str], answers: list[str], **_: object) -> list[float]:
        return [math.nan if i == 1 else float(i % 2) for i in range(len(completions))]

    items = [PromptItem("1+2=", "3"), PromptItem("4+4=", "8")]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3)
    sampled = maker.sample(items, 4, sampling, grader_failed_on_the_second)
    dropped, kept = sampled.groups
    assert dropped.ungraded and dropped.rewards == [0.0] * 4 and not dropped.varies()
    assert not kept.ungraded and kept.rewards == [0.0, 1.0, 0.0, 1.0] and kept.varies()
    assert sampled.stats[keys.UNGRADED_GROUPS] == 1.0

    batch = maker.collate(sampled.groups, version=0, step=0, stats=sampled.stats, max_new_tokens=6)
    assert not batch.response_mask[:4].any()  # no token of the dropped group reaches the loss
    lengths = [len(c.token_ids) for c in kept.completions]
    assert batch.response_mask[4:].sum(1).tolist() == lengths  # the other group untouched
    assert batch.stats[keys.UNGRADED_GROUPS] == 1.0
