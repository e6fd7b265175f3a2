"""The memory-bounded LM head against the materialised one: values, entropies, top-k ids and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from capo_lightning.models.forward import fusable_head, score_responses
from capo_lightning.models.lm_head import head_logprobs


def _materialised(hidden: torch.Tensor, weight: torch.Tensor, actions: torch.Tensor):
    """The textbook computation: full logits, log_softmax, gather (fp64, independent of the chunked code)."""
    logp = torch.log_softmax((hidden.double() @ weight.double().T), dim=-1)
    picked = logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy, logp


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_chunked_scoring_equals_unchunked_at_qwen_vocabulary(chunk: int | None) -> None:
    """V = 151,936 (Qwen2.5), a short sequence: values and both gradients equal the materialised [T, V] path."""
    torch.manual_seed(0)
    vocab, d, tokens = 151_936, 24, 7
    hidden = torch.randn(1, tokens, d, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, d)).requires_grad_(True)
    actions = torch.randint(0, vocab, (1, tokens))
    upstream = torch.randn(1, tokens)  # an arbitrary loss weight per token

    logprobs, entropy, ids = head_logprobs(hidden, weight, actions, topk=5, chunk=chunk)
    (logprobs * upstream).sum().backward()
    got_h, got_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None

    ref_lp, ref_ent, ref_logp = _materialised(hidden, weight, actions)
    (ref_lp * upstream.double()).sum().backward()
    torch.testing.assert_close(logprobs.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_logp.topk(5, dim=-1).indices)
    torch.testing.assert_close(got_h.double(), hidden.grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_w.double(), weight.grad.double(), rtol=1e-4, atol=1e-7)
    assert logprobs.shape == (1, tokens) and ids.shape == (1, tokens, 5)


def test_gradient_matches_finite_differences() -> None:
    """d logp / d h by central differences in fp64: the hand-written backward is right, not just self-consistent."""
    torch.manual_seed(1)
    hidden = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([0, 4, 10])
    assert torch.autograd.gradcheck(
        lambda h, w: head_logprobs(h, w, actions, with_entropy=False, chunk=2)[0], (hidden, weight)
    )


def test_bf16_autocast_multiplies_like_the_model_head() -> None:
    """Under autocast the logits are the bf16 product read in fp32, as F.linear under autocast gives."""
    torch.manual_seed(2)
    hidden, weight = torch.randn(4, 9, 16), torch.randn(300, 16)
    actions = torch.randint(0, 300, (4, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, _ = head_logprobs(hidden, weight, actions, chunk=5)
        logits = torch.nn.functional.linear(hidden, weight).float()
    want = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    fp32, _, _ = head_logprobs(hidden, weight, actions)
    assert (got - fp32).abs().max() > 1e-4  # bf16 really was used


def test_score_responses_fused_equals_materialised_logits(tiny_model_dir, monkeypatch) -> None:
    """The real model scored through the hooked head equals the model's own logits path (values, entropy, grads)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # left padding on one row
    assert fusable_head(model)

    def run(fused: bool):
        monkeypatch.setattr("capo_lightning.models.forward.fusable_head", lambda _m: fused)
        model.zero_grad()
        out = score_responses(model, ids, mask, 5, need_hidden=True, topk=4)
        out.logprobs.sum().backward()
        return out, [p.grad.clone() for p in model.parameters()]

    fused, g_fused = run(True)
    plain, g_plain = run(False)
    torch.testing.assert_close(fused.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.entropy, plain.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.hidden, plain.hidden)
    assert torch.equal(fused.topk_ids, plain.topk_ids)
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the materialised path is the model's own logits
    with torch.no_grad():
        logits = (
            model(input_ids=ids, attention_mask=mask.long(), position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))
            .logits[:, -6:-1]
            .float()
        )
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, -5:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(fused.logprobs.detach(), want, rtol=1e-5, atol=1e-5)


def test_models_that_transform_logits_are_not_fused(tiny_model_dir) -> None:
    """A soft-capped head (Gemma 2 style) is not h W^T: it takes the materialised path."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    assert not fusable_head(model)


def test_trimmed_padding_changes_nothing(tiny_model_dir) -> None:
    """Rows whose responses are all short and prompts all shorter than P: scoring cuts the columns no row attends
    to, and logprobs, entropies, hidden states and gradients equal the untrimmed pass (zeros where no row is)."""
    from capo_lightning.models.forward import trim_padding

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(4)
    ids = torch.randint(3, model.config.vocab_size, (2, 14))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :3] = False  # 3 columns of prompt padding in every row (P = 8)
    mask[0, 11:] = False  # responses of 3 and 4 tokens out of L = 6
    mask[1, 12:] = False
    _, trimmed_mask, kept = trim_padding(ids, mask, 6)
    assert kept == 4 and trimmed_mask.shape == (2, 9)

    def run(trim: bool):
        model.zero_grad()
        if not trim:  # the reference: the same call with trimming disabled
            import capo_lightning.models.forward as F

            original = F.trim_padding
            F.trim_padding = lambda i, m, n: (i, m, n)
        try:
            out = score_responses(model, ids, mask, 6, need_hidden=True, topk=3)
        finally:
            if not trim:
                F.trim_padding = original
        resp = mask[:, -6:]
        (out.logprobs * resp).sum().backward()
        return out, [p.grad.clone() for p in model.parameters()]

    got, g_got = run(True)
    want, g_want = run(False)
    resp = mask[:, -6:]
    assert got.logprobs.shape == (2, 6) and got.hidden.shape[:2] == (2, 6)
    torch.testing.assert_close(got.logprobs[resp], want.logprobs[resp], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy[resp], want.entropy[resp], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.hidden[resp], want.hidden[resp], rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk_ids[resp], want.topk_ids[resp])
    assert not got.logprobs[:, 4:].any()  # columns past every response are zero
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
