"""Evaluation over two real DDP ranks: each problem is graded exactly once and the metrics sum over ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.data.prompts import ArithmeticSource
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.rollout import SamplingConfig
from tests.helpers import make_trainer, multiple_of_three

VAL_PROMPTS = 7  # odd on purpose: rank 1 gets a padding problem


def _validate(model_dir: Path, **trainer_kwargs) -> dict[str, float]:
    sources = [ArithmeticSource(seed=11, max_value=30), ArithmeticSource(seed=12, max_value=30, ops=["*"])]
    dm = RolloutDataModule(
        val_source=sources,
        val_prompts=VAL_PROMPTS,
        val_samples=2,
        val_batch_size=2,
        val_sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
        eval_reward_fn=multiple_of_three,
        max_prompt_tokens=96,
    )
    module = CAPOModule(policy=PolicySpec(str(model_dir)))
    results = make_trainer(**trainer_kwargs).validate(module, datamodule=dm, verbose=False)
    assert len(results) == 2  # one result dict per validation set
    return {k: float(v) for metrics in results for k, v in metrics.items()}


def _expected(seed: int, ops: list[str]) -> float:
    source = ArithmeticSource(seed=seed, max_value=30, ops=ops)
    return sum(int(source.item(i).answer) % 3 == 0 for i in range(VAL_PROMPTS)) / VAL_PROMPTS


def test_two_rank_validation_counts_every_problem_once(tiny_model_dir: Path) -> None:
    want = {"arithmetic": _expected(11, ["+", "-", "*"]), "arithmetic_1": _expected(12, ["*"])}
    assert len(set(want.values())) == 2 and 0 < min(want.values()) < 1  # the check is not vacuous
    for got in (_validate(tiny_model_dir), _validate(tiny_model_dir, strategy="ddp_spawn", devices=2)):
        for name, accuracy in want.items():
            assert got[f"val/{name}/accuracy"] == pytest.approx(accuracy)
            assert got[f"val/{name}/pass@2"] == pytest.approx(accuracy)  # all-or-nothing per problem
        assert got["val/accuracy"] == pytest.approx(sum(want.values()) / 2)
