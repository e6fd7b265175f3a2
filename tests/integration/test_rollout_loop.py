"""HFEngine's compact decoding loop against transformers ``generate`` and against the policy's own scoring.

The loop drops a row once it has ended, so its batch shapes differ from ``generate``'s and so do the last bits of
some logits; the two sample from different random streams. What must hold, checked here: the distribution drawn from
at each step is the one ``generate`` builds from the same logits (its own processed scores, ``output_scores``);
with sampling off, the same tokens, except where the two runs' top two logits are within ``NEAR_TIE`` at the first
difference (a near-tie a shape change can flip); the draw itself is exact; and each token's two logprobs are the
policy's own scoring of the sampled sequence, raw and processed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capo_lightning.models.policy import PolicySpec, load_policy
from capo_lightning.rollout import HFEngine, SamplingConfig
from capo_lightning.rollout.decode import decode, draw, sampling_scores

PROMPTS = ["1+2=", "what is 7 times 3?", "9", "a longer prompt than the others, to pad the rest"]
NEAR_TIE = 1e-4  # logit gap below which a greedy choice may flip with the batch's shape


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path):
    model, tokenizer = load_policy(PolicySpec(str(tiny_model_dir)))
    model.eval()
    return model, tokenizer


def encode(tokenizer, rows: list[str]) -> dict:
    return tokenizer(rows, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


def frequent_token(model, enc: dict, steps: int) -> int:
    """A token that greedy decoding emits in some rows but not all, so using it as EOS ends rows at different
    steps (the random tiny model never samples its real EOS)."""
    with torch.no_grad():
        seq = model.generate(**enc, max_new_tokens=steps, do_sample=False, eos_token_id=[], pad_token_id=0)
    out = seq[:, enc["input_ids"].shape[1] :]
    for token in out[:, 1:].flatten().tolist():
        rows_with = sum(token in row.tolist() for row in out)
        if 0 < rows_with < out.shape[0]:
            return token
    pytest.fail("no token separates the rows of this tiny model's greedy output: the test cannot end rows early")


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 50, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.6, 0, 0.95), (0.9, 20, 0.8)]
)
def test_processed_distribution_equals_generates_at_every_step(policy, temperature, top_k, top_p) -> None:
    """``sampling_scores`` on the raw logits of each step of a real ``generate`` run gives the scores ``generate``
    itself sampled from (its logits processors: temperature, top-k, top-p), for every row and step."""
    model, tokenizer = policy
    enc = encode(tokenizer, [p for p in PROMPTS for _ in range(2)])
    torch.manual_seed(0)
    with torch.no_grad():
        ref = model.generate(
            **enc, max_new_tokens=12, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
            pad_token_id=0, output_scores=True, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p)
    cut = 0
    for raw, processed in zip(ref.logits, ref.scores, strict=True):
        mine = sampling_scores(raw.float(), sampling)
        assert torch.equal(mine.isinf(), processed.isinf())
        kept = ~mine.isinf()
        torch.testing.assert_close(mine[kept], processed[kept].float(), rtol=1e-6, atol=1e-6)
        cut += int((~kept).sum())
    assert cut > 0 or (top_k == 0 and top_p == 1.0)  # the warpers acted in the cases that have them


def test_top_k_keeps_ties_and_top_p_keeps_the_most_likely_token() -> None:
    """Hand-worked: top-k keeps every token tied with the k-th value (as transformers does); top-p keeps the
    smallest set of most likely tokens holding the mass, and never empties a row."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0], [10.0, 0.0, 0.0, 0.0, 0.0]])
    kept = ~sampling_scores(logits, SamplingConfig(temperature=1.0, top_k=2)).isinf()
    assert kept.tolist() == [[True, True, True, False, False], [True, True, True, True, True]]
    kept = ~sampling_scores(logits, SamplingConfig(temperature=1.0, top_k=0, top_p=0.5)).isinf()
    assert kept.tolist() == [[True, False, False, False, False], [True, False, False, False, False]]
    probs = torch.tensor([0.5, 0.3, 0.2])  # p = 0.7: 0.5 alone holds too little, 0.5 + 0.3 enough
    kept = ~sampling_scores(probs.log()[None], SamplingConfig(temperature=1.0, top_k=0, top_p=0.7)).isinf()
    assert kept.tolist() == [[True, True, False]]


def test_inverse_cdf_draw_has_the_given_frequencies() -> None:
    """200,000 draws from a fixed distribution land within 5 standard errors of each probability; a
    probability-0 token is never drawn, not even at the ends of [0, 1)."""
    probs = torch.tensor([0.1, 0.0, 0.35, 0.05, 0.5, 0.0])
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    ids = draw(probs.expand(n, -1), torch.rand(n, generator=gen, dtype=torch.float64))
    freq = torch.bincount(ids, minlength=6).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), freq
    edges = torch.tensor([0.0, 1.0 - 2**-53, 0.1, 0.1 + 1e-12], dtype=torch.float64)
    got = draw(probs.expand(4, -1), edges)
    assert got.tolist()[:2] == [0, 4] and all(probs[i] > 0 for i in got)


def test_greedy_tokens_equal_generates_up_to_near_ties(policy) -> None:
    """Sampling off: the loop's tokens equal ``generate``'s, rows ending at different steps (so the loop really
    drops rows); a difference is allowed only at a near-tie of generate's own logits, and then the rest of that
    row is not compared."""
    model, tokenizer = policy
    enc = encode(tokenizer, PROMPTS)
    eos = frequent_token(model, enc, 16)
    with torch.no_grad():
        ref = model.generate(
            **enc, max_new_tokens=16, do_sample=False, eos_token_id=[eos], pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        got = decode(model, enc["input_ids"], enc["attention_mask"], SamplingConfig(max_new_tokens=16, temperature=0),
                     [eos], torch.zeros(16, len(PROMPTS), dtype=torch.float64))  # fmt: skip
    want = ref.sequences[:, enc["input_ids"].shape[1] :]
    lengths = [len(t) for t in got.tokens]
    assert len(set(lengths)) > 1 and "stop" in got.finish_reasons, lengths
    for i, tokens in enumerate(got.tokens):
        row = want[i].tolist()
        for t, token in enumerate(tokens):
            if token != row[t]:
                top2 = ref.logits[t][i].float().topk(2).values
                assert float(top2[0] - top2[1]) < NEAR_TIE, (i, t)
                break
        else:
            ended = row[len(tokens) - 1] == eos or len(tokens) == 16
            assert ended and (len(tokens) == 16 or all(x == 0 for x in row[len(tokens) :])), (i, row, tokens)
    assert got.sample_logprobs == [[0.0] * n for n in lengths]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.8, 7, 0.9)])
def test_logprobs_are_the_policys_own_scoring(policy, temperature, top_k, top_p) -> None:
    """Each sampled token's raw logprob is log_softmax of the policy's logits for the whole sequence scored in one
    pass (no cache, no other rows); its sample logprob is the same under ``sampling_scores``; rows end at
    different steps."""
    model, tokenizer = policy
    rows = [p for p in PROMPTS for _ in range(3)]
    enc = encode(tokenizer, rows)
    eos = frequent_token(model, enc, 12)
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p)
    uniforms = torch.rand(12, len(rows), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        got = decode(model, enc["input_ids"], enc["attention_mask"], sampling, [eos], uniforms)
    assert len({len(t) for t in got.tokens}) > 1
    for i, tokens in enumerate(got.tokens):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        ids = torch.cat([prompt, torch.tensor(tokens)])
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, len(prompt) - 1 : -1].float()  # [L, V]
        index = torch.tensor(tokens)[:, None]
        raw = logits.log_softmax(-1).gather(1, index).squeeze(1)
        sampled = sampling_scores(logits, sampling).log_softmax(-1).gather(1, index).squeeze(1)
        torch.testing.assert_close(torch.tensor(got.logprobs[i]), raw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got.sample_logprobs[i]), sampled, rtol=1e-5, atol=1e-4)
        assert got.finish_reasons[i] == ("stop" if tokens[-1] == eos else "length")
        assert eos not in tokens[:-1]


def test_a_rows_tokens_do_not_depend_on_the_rest_of_the_batch(policy) -> None:
    """The same seed gives each completion the same tokens whether its rows are decoded 12 at a time, 5 at a time
    or one by one: a row's draws are its own uniforms, and dropping other rows changes nothing."""
    model, tokenizer = policy
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=50, seed=7)
    runs = []
    for size in (12, 5, 1):
        engine = HFEngine(max_batch_size=size)
        engine.bind(model, tokenizer)
        runs.append(engine.generate(PROMPTS[:3], n=4, sampling=sampling))
    for other in runs[1:]:
        assert [c.token_ids for c in other] == [c.token_ids for c in runs[0]]
        for a, b in zip(other, runs[0], strict=True):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)
    generated = HFEngine(loop="generate")
    generated.bind(model, tokenizer)
    assert generated.generate(PROMPTS[:3], n=4, sampling=sampling)[0].sample_logprobs is None


def test_bad_loop_name_is_refused() -> None:
    with pytest.raises(ValueError, match="HFEngine loop must be one of"):
        HFEngine(loop="fast")
