"""The memory-bounded LM head on a GPU at Qwen2.5's vocabulary: under bf16 autocast it matches the materialised
head (values, gradients) and its peak memory stays far below it. Auto-marked ``gpu``; ``CAPO_GPU_DRY_RUN=1``
runs it on CPU at a small shape (values and gradients only)."""

from __future__ import annotations

import os

import pytest
import torch

from capo_lightning.models.lm_head import head_logprobs

DRY = os.environ.get("CAPO_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
VOCAB, D, TOKENS = (4096, 64, 256) if DRY else (151_936, 1536, 8192)
pytestmark = pytest.mark.skipif(not DRY and not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(TOKENS, D, device=DEVICE, generator=gen).requires_grad_(True)
    weight = (0.02 * torch.randn(VOCAB, D, device=DEVICE, generator=gen)).requires_grad_(True)
    actions = torch.randint(0, VOCAB, (TOKENS,), device=DEVICE, generator=gen)
    upstream = torch.randn(TOKENS, device=DEVICE, generator=gen)
    return hidden, weight, actions, upstream


def _peak(fn) -> tuple[object, float]:  # noqa: ANN001
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    out = fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**30
    return out, float("nan")


def test_chunked_head_matches_the_materialised_head_under_bf16_autocast_with_far_less_memory() -> None:
    hidden, weight, actions, upstream = _inputs()

    def chunked():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logp, _, _ = head_logprobs(hidden, weight, actions, topk=50)
        (logp * upstream).sum().backward()
        return logp.detach(), hidden.grad.clone(), weight.grad.clone()

    def materialised():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(hidden, weight).float()
        logp = logits.gather(-1, actions[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        (logp * upstream).sum().backward()
        return logp.detach(), hidden.grad.clone(), weight.grad.clone()

    (lp_c, gh_c, gw_c), mem_c = _peak(chunked)
    hidden.grad, weight.grad = None, None
    (lp_m, gh_m, gw_m), mem_m = _peak(materialised)
    torch.testing.assert_close(lp_c, lp_m, rtol=0, atol=2e-3)
    torch.testing.assert_close(gh_c, gh_m, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw_c, gw_m, rtol=2e-2, atol=2e-3)
    print(f"\nhead at V={VOCAB}, T={TOKENS}: peak {mem_c:.2f} GiB chunked vs {mem_m:.2f} GiB materialised")
    if DEVICE == "cuda":
        assert mem_c < 0.5 * mem_m
