"""Objective math against values worked by hand (the working is in the comments) and autograd."""

from __future__ import annotations

import math

import pytest
import torch

from capo_lightning.objectives import GRPO, Normalizer
from capo_lightning.objectives import functional as F


def test_group_advantages_hand_worked() -> None:
    # group 0: rewards [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4*0.25/3 = 1/3, std = 0.57735
    #   A = +-0.5 / (0.57735 + 1e-4) = +-0.86588
    # group 1: rewards [1, 1] -> all agree -> 0;  group 2: a single completion -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 5, 5, 9])
    adv = F.group_advantages(rewards, groups, scale_by_std=True, eps=1e-4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0]))


def test_group_advantages_without_std_and_interleaved_groups() -> None:
    # Dr.GRPO style: mean-centred only. group 3 = rewards [2, 0, 1] (mean 1) at rows 0, 2, 4;
    # group 1 = rewards [0.5, 1.5] (mean 1) at rows 1, 3.
    rewards = torch.tensor([2.0, 0.5, 0.0, 1.5, 1.0])
    groups = torch.tensor([3, 1, 3, 1, 3])
    adv = F.group_advantages(rewards, groups, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -1.0, 0.5, 0.0]))


def test_clipped_surrogate_hand_worked() -> None:
    # ratios r = exp(lp - old) = [e^0.5, e^-0.5, 1.0]; advantages A = [+1, -1, +2]
    # token 0: r = 1.6487 > 1.2 with A > 0 -> clipped: loss = -1.2 * 1 = -1.2, clipped_high
    # token 1: r = 0.6065 < 0.8 with A < 0 -> min(-0.6065, -0.8) = -0.8 -> loss 0.8, clipped_low
    # token 2: r = 1 -> loss = -2
    lp = torch.tensor([[0.5, -0.5, 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, ratio, low, high = F.clipped_surrogate(lp, old, adv, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -2.0]]))
    assert low.tolist() == [[False, True, False]]
    assert high.tolist() == [[True, False, False]]
    torch.testing.assert_close(ratio, torch.exp(lp))


def test_dual_clip_caps_negative_advantage_loss() -> None:
    # r = e^2 = 7.389, A = -1: plain PPO loss = -min(-7.389, -1.2) = 7.389; dual clip c = 3 caps it at 3
    lp, old, adv = torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([-1.0])
    plain, *_ = F.clipped_surrogate(lp, old, adv, 0.2, 0.2)
    capped, *_ = F.clipped_surrogate(lp, old, adv, 0.2, 0.2, dual_clip=3.0)
    assert plain.item() == pytest.approx(math.exp(2.0))
    assert capped.item() == pytest.approx(3.0)


def test_k3_kl_hand_worked_and_zero_at_equality() -> None:
    # p = log pi = -1, q = log ref = -2: q - p = -1 -> e^-1 - (-1) - 1 = 0.36788
    kl = F.k3_kl(torch.tensor([[-1.0, -0.3]]), torch.tensor([[-2.0, -0.3]]))
    torch.testing.assert_close(kl, torch.tensor([[math.exp(-1.0), 0.0]]))


def test_seq_mean_token_mean_hand_worked() -> None:
    # values row 0 = [1, 2, 3] with mask [1, 1, 0] -> mean 1.5; row 1 = [4, 5, 6], mask [0, 0, 0] -> 0
    # row 2 = [2, 2, 8] mask [1, 1, 1] -> 4.  Sequence mean over the 3 sequences = (1.5 + 0 + 4) / 3
    values = torch.tensor([[1.0, 2, 3], [4, 5, 6], [2, 2, 8]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    norm = Normalizer.from_mask(mask)
    assert (norm.num_sequences, norm.num_tokens) == (3.0, 5.0)
    out = F.aggregate(values, mask, "seq_mean_token_mean", norm)
    assert out.item() == pytest.approx(5.5 / 3)
    # token_mean: (1 + 2 + 2 + 2 + 8) / 5 = 3;  token-sum / (L = 4) / 3 sequences = 15 / 12
    assert F.aggregate(values, mask, "token_mean", norm).item() == pytest.approx(3.0)
    norm_l = Normalizer.from_mask(mask, max_len=4)
    assert F.aggregate(values, mask, "seq_mean_token_sum_norm", norm_l).item() == pytest.approx(15 / 12)


def test_grpo_loss_and_gradient_hand_worked() -> None:
    # Two sequences of one group: rewards [1, 0] -> A = +-0.5 / (std 0.7071 + 1e-4) = +-0.70700
    # On-policy (old = lp.detach()): ratio 1 and d ratio / d lp = 1, per-token loss = -A_i * ratio.
    # Row 0 (A = +a) keeps 2 tokens, row 1 (A = -a) keeps 1.
    # loss = ( (-a - a)/2 + (+a)/1 ) / 2 = 0, but the gradient is not zero:
    # d loss / d lp[0, t] = -a / 2 / 2 = -a/4 for t in {0, 1};  d loss / d lp[1, 0] = +a / 1 / 2 = a/2
    grpo = GRPO()
    adv = grpo.advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a]))
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    out = grpo(lp, lp.detach(), None, adv, mask, Normalizer.from_mask(mask))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-a / 4, -a / 4], [a / 2, 0.0]]))
    assert out.metrics["objective/ratio_mean"].item() == pytest.approx(1.0)
    assert out.metrics["objective/clip_frac_low"].item() == 0.0


def test_grpo_kl_term_needs_reference_and_adds_beta_k3() -> None:
    grpo = GRPO(beta=0.5)
    assert grpo.needs_reference and not GRPO().needs_reference
    lp = torch.tensor([[-1.0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    norm = Normalizer.from_mask(mask)
    # A = 0 (singleton group) so the loss is only beta * k3 = 0.5 * (e^-1 - (-1) - 1) = 0.5 * 0.36788
    out = grpo(lp, lp, torch.tensor([[-2.0]]), torch.zeros(1), mask, norm)
    assert out.loss.item() == pytest.approx(0.5 * math.exp(-1.0))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo(lp, lp, None, torch.zeros(1), mask, norm)


def test_micro_batch_split_gives_same_gradient() -> None:
    # The normaliser is global, so summing micro-batch gradients equals the full-batch gradient.
    torch.manual_seed(0)
    lp = torch.randn(6, 5, requires_grad=True)
    old = (lp + 0.1 * torch.randn(6, 5)).detach()
    mask = torch.rand(6, 5) > 0.3
    adv = torch.randn(6)
    grpo = GRPO()
    norm = Normalizer.from_mask(mask)
    grpo(lp, old, None, adv, mask, norm).loss.backward()
    full = lp.grad.clone()
    lp.grad = None
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        grpo(lp[rows], old[rows], None, adv[rows], mask[rows], norm).loss.backward()
    torch.testing.assert_close(lp.grad, full)
