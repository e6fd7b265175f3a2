"""HFEngine's behaviour logprobs: with ``loop="generate"``, read while generate runs, against generate's own per-step
logits; on a LoRA policy, with either loop, against the policy's own scoring (the compact loop:
test_rollout_loop.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capo_lightning.models.policy import PolicySpec, load_policy
from capo_lightning.rollout import HFEngine, SamplingConfig


@pytest.mark.parametrize("temperature,top_k", [(1.0, 50), (0.7, 5), (0.0, 0)])
def test_streamed_logprobs_equal_the_raw_logits_of_each_step(
    tiny_model_dir: Path, temperature: float, top_k: int
) -> None:
    """Same seed, same sampled tokens; each token's logprob is log_softmax of that step's RAW logits (temperature
    1, no top-k), as ``output_logits=True`` returns them: what the trainer's logprobs compare against."""
    policy, tokenizer = load_policy(PolicySpec(str(tiny_model_dir)))
    engine = HFEngine(max_batch_size=8, loop="generate")
    engine.bind(policy, tokenizer)
    prompts = ["1+2=", "what is 7 times 3?", "9"]
    sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=top_k, seed=11)
    got = engine.generate(prompts, n=2, sampling=sampling)

    rows = [p for p in prompts for _ in range(2)]
    enc = tokenizer(rows, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    policy.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(11)
        greedy = temperature == 0
        ref = policy.generate(
            **enc, max_new_tokens=10, do_sample=not greedy, temperature=None if greedy else temperature,
            top_p=None if greedy else 1.0, top_k=None if greedy else top_k, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=engine._eos_ids(), output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    responses = ref.sequences[:, enc["input_ids"].shape[1] :]
    logp = torch.stack([torch.log_softmax(step.float(), -1) for step in ref.logits], dim=1)  # [n, L, V]
    want = logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    assert sum(len(c.token_ids) for c in got) > 12
    for i, completion in enumerate(got):
        n = len(completion.token_ids)
        assert completion.token_ids == responses[i, :n].tolist()
        torch.testing.assert_close(torch.tensor(completion.logprobs), want[i, :n], rtol=1e-5, atol=1e-5)
    if temperature != 1.0 and temperature != 0:
        assert any(lp < -1e-3 for c in got for lp in c.logprobs)


@pytest.mark.parametrize("loop", ["compact", "generate"])
def test_streamed_logprobs_of_a_lora_policy(tiny_model_dir: Path, loop: str) -> None:
    """A PEFT model's generate calls the wrapped transformers model directly: the hooks still see every step; the
    compact loop calls the PEFT model's forward, adapters included."""
    from capo_lightning.models.lora import LoraSpec

    policy, tokenizer = load_policy(PolicySpec(str(tiny_model_dir), lora=LoraSpec(rank=4, target_modules=["q_proj"])))
    with torch.no_grad():  # adapters that change the output, so a loop that skipped them would differ
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    engine = HFEngine(loop=loop)
    engine.bind(policy, tokenizer)
    got = engine.generate(["1+2=", "3"], n=2, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, seed=5))
    assert all(len(c.logprobs) == len(c.token_ids) >= 1 for c in got)
    rows = [p for p in ["1+2=", "3"] for _ in range(2)]
    enc = tokenizer(rows, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    for i, completion in enumerate(got):
        ids = torch.cat([enc["input_ids"][i][enc["attention_mask"][i].bool()], torch.tensor(completion.token_ids)])
        with torch.no_grad():
            logits = policy(input_ids=ids[None]).logits[0, -len(completion.token_ids) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), want, rtol=1e-5, atol=1e-5)
