"""The four objectives (GRPO, Dr.GRPO, DAPO, REINFORCE) against values worked by hand.

Pure tensor tests: every expected number is derived in the comments next to it (never copied from
running the code), gradients are checked through autograd against the hand-derived gradient, and
the step-level normaliser is checked for micro-batch and rank invariance.

Notation: r = exp(lp - old) the ratio, A the advantage, m the mask, n_i the kept tokens of row i,
N the number of sequences. Per-token loss l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), and
d l / d lp = -r A where the unclipped branch is taken, 0 where the clip acts.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import capo_lightning.objectives as objectives
from capo_lightning.objectives import DAPO, GRPO, REINFORCE, DrGRPO, LossOutput, Normalizer, Objective
from capo_lightning.objectives import functional as F
from capo_lightning.rewards.math import math_reward
from capo_lightning.rewards.shaping import OverlongPenalty

ALL_CLASSES = (GRPO, DrGRPO, DAPO, REINFORCE)


def _loss_and_grad(
    obj: Objective,
    lp0: Tensor,
    old: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    norm: Normalizer,
    ref: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[LossOutput, Tensor]:
    """Run ``obj`` on a fresh leaf copy of ``lp0`` (old = lp.detach() when ``old`` is None); return output and grad."""
    lp = lp0.clone().requires_grad_(True)
    out = obj(lp, lp.detach() if old is None else old, ref, adv, mask, norm, weights)
    out.loss.backward()
    assert lp.grad is not None
    return out, lp.grad


# ------------------------------------------------------------------------------------------------
# 1. Hand-worked batch, on-policy: masked interior token, unequal lengths, truncated completion,
#    zero-variance group, singleton group.
# ------------------------------------------------------------------------------------------------
#
# row  group  reward  mask (L = 4)   n_i  note
#  0     0      1     [1, 0, 1, 0]    2   interior token 1 masked
#  1     0      0     [1, 1, 1, 0]    3
#  2     0      0     [1, 1, 1, 1]    4   truncated: ran to the budget, every token present
#  3     7      1     [1, 0, 0, 0]    1   group 7 = rewards [1, 1]: zero variance
#  4     7      1     [1, 1, 0, 0]    2
#  5     9      1     [1, 1, 1, 0]    3   singleton group
# N = 6 sequences, 2 + 3 + 4 + 1 + 2 + 3 = 15 kept tokens.
# With the truncated row masked out (model.mask_truncated: response_mask & ~truncated):
# still N = 6 sequences (the Normalizer counts rows), 15 - 4 = 11 kept tokens.
#
# Group 0 rewards [1, 0, 0]: mean 1/3, deviations [2/3, -1/3, -1/3],
#   unbiased var = (4/9 + 1/9 + 1/9) / (3 - 1) = 1/3, std = sqrt(1/3) = 0.57735.

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 7, 7, 9])
TRUNCATED = torch.tensor([False, False, True, False, False, False])
MASK = torch.tensor(
    [[1, 0, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool
)
MASK_NO_TRUNC = MASK & ~TRUNCATED.unsqueeze(1)  # row 2 all False
LP = -(torch.arange(24, dtype=torch.float32).reshape(6, 4) + 1.0) / 10.0  # any finite logprobs
DR_LEN = 8  # Dr.GRPO's constant L (max_new_tokens), deliberately != the padded width 4


def test_batch_counts() -> None:
    norm = Normalizer.from_mask(MASK)
    assert (norm.num_sequences, norm.num_tokens) == (6.0, 15.0)
    norm = Normalizer.from_mask(MASK_NO_TRUNC)
    assert (norm.num_sequences, norm.num_tokens) == (6.0, 11.0)


def test_grpo_hand_worked_on_policy() -> None:
    # s = std + eps = sqrt(1/3) + 1e-4; A = [ (2/3)/s, -(1/3)/s, -(1/3)/s, 0 (zero var), 0 (zero var), 0 (singleton) ]
    s = math.sqrt(1 / 3) + 1e-4
    grpo = GRPO()
    adv = grpo.advantages(REWARDS, GROUPS)
    torch.testing.assert_close(adv, torch.tensor([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0.0, 0.0, 0.0]))

    # ratio 1, per-token loss -A_i, each sequence's token mean is -A_i:
    # loss = -(A_0 + A_1 + A_2 + 0 + 0 + 0) / 6 = -((2/3 - 1/3 - 1/3)/s) / 6 = 0
    # d loss / d lp[i, t] = -A_i m_it / (n_i * 6):
    #   row 0: -(2/3)/s / (2*6) = -1/(18 s) at t = 0, 2 (t = 1 masked: 0)
    #   row 1: +(1/3)/s / (3*6) = +1/(54 s) at t = 0..2
    #   row 2: +(1/3)/s / (4*6) = +1/(72 s) at t = 0..3 (truncated row, every token present)
    #   rows 3-5: A = 0 -> 0
    out, grad = _loss_and_grad(grpo, LP, None, adv, MASK, Normalizer.from_mask(MASK))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    g0, g1, g2 = -1 / (18 * s), 1 / (54 * s), 1 / (72 * s)
    expected = torch.tensor(
        [[g0, 0, g0, 0], [g1, g1, g1, 0], [g2, g2, g2, g2], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    torch.testing.assert_close(grad, expected)
    assert out.metrics["objective/ratio_mean"].item() == pytest.approx(1.0)
    assert out.metrics["objective/clip_frac_low"].item() == 0.0
    assert out.metrics["objective/clip_frac_high"].item() == 0.0

    # Truncated row masked out: advantages are unchanged (computed from rewards before masking), the row
    # contributes 0 but still counts among the 6 sequences:
    # loss = -(A_0 + A_1 + 0) / 6 = -((2/3 - 1/3)/s) / 6 = -1/(18 s); row 2 gradient becomes 0
    out, grad = _loss_and_grad(grpo, LP, None, adv, MASK_NO_TRUNC, Normalizer.from_mask(MASK_NO_TRUNC))
    assert out.loss.item() == pytest.approx(-1 / (18 * s), rel=1e-5)
    expected[2] = 0.0
    torch.testing.assert_close(grad, expected)


def test_dr_grpo_hand_worked_on_policy() -> None:
    # No std: A = R - mean_g R = [2/3, -1/3, -1/3, 0, 0, 0] (zero-variance and singleton groups: 0)
    dr = DrGRPO()
    adv = dr.advantages(REWARDS, GROUPS)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))

    # Denominator L * N = 8 * 6 = 48 (L from Normalizer.max_len, not the padded width 4).
    # sum_{i,t} m (-A_i) = -(2 * 2/3 + 3 * (-1/3) + 4 * (-1/3)) = -(4/3 - 3/3 - 4/3) = 1 -> loss = 1/48
    # grad = -A_i m_it / 48: row 0: -(2/3)/48 = -1/72; rows 1, 2: +(1/3)/48 = +1/144; rows 3-5: 0
    norm = Normalizer.from_mask(MASK, max_len=DR_LEN)
    assert norm.denominator(dr.aggregation) == 48.0
    out, grad = _loss_and_grad(dr, LP, None, adv, MASK, norm)
    assert out.loss.item() == pytest.approx(1 / 48, rel=1e-5)
    a, b = -1 / 72, 1 / 144
    expected = torch.tensor([[a, 0, a, 0], [b, b, b, 0], [b, b, b, b], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(grad, expected)

    # Truncated row masked out: denominator still 8 * 6 = 48.
    # sum m (-A) = -(4/3 - 1) = -1/3 -> loss = -1/144; row 2 gradient 0
    out, grad = _loss_and_grad(dr, LP, None, adv, MASK_NO_TRUNC, Normalizer.from_mask(MASK_NO_TRUNC, max_len=DR_LEN))
    assert out.loss.item() == pytest.approx(-1 / 144, rel=1e-5)
    expected[2] = 0.0
    torch.testing.assert_close(grad, expected)


def test_dapo_hand_worked_on_policy() -> None:
    # s = sqrt(1/3) + 1e-6 (DAPO's eps); A = [(2/3)/s, -(1/3)/s, -(1/3)/s, 0, 0, 0]
    s = math.sqrt(1 / 3) + 1e-6
    dapo = DAPO()
    adv = dapo.advantages(REWARDS, GROUPS)
    torch.testing.assert_close(adv, torch.tensor([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0.0, 0.0, 0.0]))

    # token_mean over the 15 kept tokens: sum m (-A) = -(2*(2/3) - 3*(1/3) - 4*(1/3)) / s = 1/s
    # loss = 1/(15 s); grad = -A_i m_it / 15: row 0 -(2/3)/(15 s) = -2/(45 s); rows 1, 2: +(1/3)/(15 s) = 1/(45 s)
    norm = Normalizer.from_mask(MASK)
    out, grad = _loss_and_grad(dapo, LP, None, adv, MASK, norm)
    assert out.loss.item() == pytest.approx(1 / (15 * s), rel=1e-5)
    a, b = -2 / (45 * s), 1 / (45 * s)
    expected = torch.tensor([[a, 0, a, 0], [b, b, b, 0], [b, b, b, b], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(grad, expected)

    # Truncated row masked out (DAPO's overlong filtering): denominator 11 kept tokens.
    # sum m (-A) = -(4/3 - 1)/s = -1/(3 s) -> loss = -1/(33 s)
    # grad: row 0 -(2/3)/(11 s) = -2/(33 s); row 1 +(1/3)/(11 s) = 1/(33 s); row 2: 0
    out, grad = _loss_and_grad(dapo, LP, None, adv, MASK_NO_TRUNC, Normalizer.from_mask(MASK_NO_TRUNC))
    assert out.loss.item() == pytest.approx(-1 / (33 * s), rel=1e-5)
    a, b = -2 / (33 * s), 1 / (33 * s)
    expected = torch.tensor([[a, 0, a, 0], [b, b, b, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(grad, expected)


def test_reinforce_hand_worked_on_policy() -> None:
    # A = raw reward, also for the zero-variance group (rows 3, 4 -> 1) and the singleton (row 5 -> 1)
    rf = REINFORCE()
    adv = rf.advantages(REWARDS, GROUPS)
    torch.testing.assert_close(adv, torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))

    # seq_mean_token_mean: per-sequence token mean = -R_i -> loss = -(1 + 0 + 0 + 1 + 1 + 1) / 6 = -2/3
    # grad = -R_i m_it / (n_i * 6): row 0 -1/12 (t = 0, 2); row 3 -1/6; row 4 -1/12; row 5 -1/18; rows 1, 2: 0
    out, grad = _loss_and_grad(rf, LP, None, adv, MASK, Normalizer.from_mask(MASK))
    assert out.loss.item() == pytest.approx(-2 / 3, rel=1e-6)
    expected = torch.tensor(
        [
            [-1 / 12, 0, -1 / 12, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [-1 / 6, 0, 0, 0],
            [-1 / 12, -1 / 12, 0, 0],
            [-1 / 18, -1 / 18, -1 / 18, 0],
        ]
    )
    torch.testing.assert_close(grad, expected)

    # Truncated row (reward 0) masked out: it still counts among the 6 sequences, so the loss stays -4/6
    # (it would be -4/5 if a fully masked row left the denominator); gradient unchanged
    out, grad = _loss_and_grad(rf, LP, None, adv, MASK_NO_TRUNC, Normalizer.from_mask(MASK_NO_TRUNC))
    assert out.loss.item() == pytest.approx(-2 / 3, rel=1e-6)
    torch.testing.assert_close(grad, expected)


def test_advantages_accept_any_group_id_order() -> None:
    # The same batch with rows shuffled and different group ids gives the same per-row advantages.
    perm = torch.tensor([5, 2, 3, 0, 4, 1])
    remap = {0: 42, 7: -3, 9: 0}
    groups = torch.tensor([remap[int(g)] for g in GROUPS[perm]])
    for cls in ALL_CLASSES:
        obj = cls()
        torch.testing.assert_close(obj.advantages(REWARDS[perm], groups), obj.advantages(REWARDS, GROUPS)[perm])


# ------------------------------------------------------------------------------------------------
# 1b. Off-policy: ratios != 1, the clip acts.
# ------------------------------------------------------------------------------------------------
#
# One group, rewards [1, 0]. Two kept tokens per row; the third token of each row is masked and has an
# extreme ratio that must not leak into loss or gradient.
#   row 0 (A > 0): ratios [1.25, 1.10, e^3]
#   row 1 (A < 0): ratios [0.70, 1.30, e^2]
# Per kept token, eps_low = 0.2 for all:
#   r = 1.25, A > 0: symmetric clip 0.2 -> clip(r) = 1.2 < r -> l = -1.2 A, grad 0 (clipped high)
#                    DAPO clip_high 0.28 -> 1.25 <= 1.28 -> l = -1.25 A, grad -1.25 A (NOT clipped)
#   r = 1.10, A > 0: inside the band -> l = -1.1 A, grad -1.1 A
#   r = 0.70, A < 0: clip(r) = 0.8; min(0.7 A, 0.8 A) = 0.8 A -> l = -0.8 A, grad 0 (clipped low)
#   r = 1.30, A < 0: min(1.3 A, 1.2 A or 1.28 A) = 1.3 A -> l = -1.3 A, grad -1.3 A (no clip for A < 0 above 1)

OFF_OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
OFF_RATIOS = torch.tensor([[1.25, 1.10, math.exp(3.0)], [0.70, 1.30, math.exp(2.0)]])
OFF_LP = OFF_OLD + OFF_RATIOS.log()
OFF_MASK = torch.tensor([[True, True, False], [True, True, False]])
OFF_REWARDS = torch.tensor([1.0, 0.0])
OFF_GROUPS = torch.tensor([3, 3])


def test_grpo_off_policy_clip() -> None:
    # A = +-0.5 / (sqrt(0.5) + 1e-4) = +-a
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    grpo = GRPO()
    adv = grpo.advantages(OFF_REWARDS, OFF_GROUPS)
    torch.testing.assert_close(adv, torch.tensor([a, -a]))
    # row 0 token mean: (-1.2 a - 1.1 a)/2 = -1.15 a; row 1: (0.8 a + 1.3 a)/2 = 1.05 a
    # loss = (-1.15 a + 1.05 a) / 2 = -0.05 a
    # grad: row 0 [0 (clipped), -1.1 a / (2*2) = -0.275 a, 0]; row 1 [0 (clipped), +1.3 a / 4 = 0.325 a, 0]
    out, grad = _loss_and_grad(grpo, OFF_LP, OFF_OLD, adv, OFF_MASK, Normalizer.from_mask(OFF_MASK))
    assert out.loss.item() == pytest.approx(-0.05 * a, rel=1e-4)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.275 * a, 0.0], [0.0, 0.325 * a, 0.0]]))
    # 1 of 4 kept tokens clipped high (r = 1.25), 1 of 4 clipped low (r = 0.7)
    # ratio mean over kept tokens = (1.25 + 1.1 + 0.7 + 1.3) / 4 = 1.0875
    assert out.metrics["objective/clip_frac_high"].item() == pytest.approx(0.25)
    assert out.metrics["objective/clip_frac_low"].item() == pytest.approx(0.25)
    assert out.metrics["objective/ratio_mean"].item() == pytest.approx(1.0875, rel=1e-6)


def test_dapo_off_policy_clip_higher() -> None:
    # A = +-0.5 / (sqrt(0.5) + 1e-6) = +-d
    d = 0.5 / (math.sqrt(0.5) + 1e-6)
    dapo = DAPO()
    adv = dapo.advantages(OFF_REWARDS, OFF_GROUPS)
    torch.testing.assert_close(adv, torch.tensor([d, -d]))
    # per-token: row 0 [-1.25 d (not clipped under 0.28), -1.1 d]; row 1 [+0.8 d (clipped), +1.3 d]
    # token_mean over 4 kept: (-1.25 - 1.1 + 0.8 + 1.3) d / 4 = -0.25 d / 4 = -0.0625 d
    # grad: row 0 [-1.25 d/4 = -0.3125 d, -1.1 d/4 = -0.275 d, 0]; row 1 [0, 1.3 d/4 = 0.325 d, 0]
    out, grad = _loss_and_grad(dapo, OFF_LP, OFF_OLD, adv, OFF_MASK, Normalizer.from_mask(OFF_MASK))
    assert out.loss.item() == pytest.approx(-0.0625 * d, rel=1e-4)
    torch.testing.assert_close(grad, torch.tensor([[-0.3125 * d, -0.275 * d, 0.0], [0.0, 0.325 * d, 0.0]]))
    assert out.metrics["objective/clip_frac_high"].item() == 0.0
    assert out.metrics["objective/clip_frac_low"].item() == pytest.approx(0.25)

    # The same token under a symmetric 0.2 clip: r = 1.25 > 1.2 is clipped, its gradient vanishes
    # per-token: [-1.2 d, -1.1 d], [0.8 d, 1.3 d] -> loss = (-1.2 - 1.1 + 0.8 + 1.3) d / 4 = -0.05 d
    out, grad = _loss_and_grad(DAPO(clip_high=0.2), OFF_LP, OFF_OLD, adv, OFF_MASK, Normalizer.from_mask(OFF_MASK))
    assert out.loss.item() == pytest.approx(-0.05 * d, rel=1e-4)
    assert grad[0, 0].item() == 0.0
    assert out.metrics["objective/clip_frac_high"].item() == pytest.approx(0.25)


def test_dr_grpo_off_policy_clip() -> None:
    # A = +-0.5 (no std); L = 3, N = 2 -> denominator 6
    dr = DrGRPO()
    adv = dr.advantages(OFF_REWARDS, OFF_GROUPS)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))
    # per-token: row 0 [-1.2*0.5 = -0.6, -1.1*0.5 = -0.55]; row 1 [0.8*0.5 = 0.4, 1.3*0.5 = 0.65]
    # loss = (-0.6 - 0.55 + 0.4 + 0.65) / 6 = -0.1 / 6 = -1/60
    # grad: row 0 [0, -0.55/6, 0]; row 1 [0, 0.65/6, 0]
    out, grad = _loss_and_grad(dr, OFF_LP, OFF_OLD, adv, OFF_MASK, Normalizer.from_mask(OFF_MASK, max_len=3))
    assert out.loss.item() == pytest.approx(-1 / 60, rel=1e-4)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.55 / 6, 0.0], [0.0, 0.65 / 6, 0.0]]))


def test_reinforce_off_policy_clip() -> None:
    # A = R = [1, 0]: row 1 contributes nothing.
    # row 0 token mean: (-1.2 - 1.1) / 2 = -1.15; loss = (-1.15 + 0) / 2 = -0.575
    # grad: row 0 [0 (clipped), -1.1 / (2*2) = -0.275, 0]; row 1: 0
    rf = REINFORCE()
    adv = rf.advantages(OFF_REWARDS, OFF_GROUPS)
    out, grad = _loss_and_grad(rf, OFF_LP, OFF_OLD, adv, OFF_MASK, Normalizer.from_mask(OFF_MASK))
    assert out.loss.item() == pytest.approx(-0.575, rel=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.275, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("cls", [GRPO, DAPO, DrGRPO])
def test_identical_non_dyadic_rewards_give_zero_advantage(cls: type[Objective]) -> None:
    # 16 copies of exactly the same float32 reward: every deviation from the mean is 0 in exact arithmetic,
    # and the docstring promises "a group whose rewards all agree gets 0".
    rewards = torch.full((16,), 0.7)
    assert F.zero_std_group_fraction(rewards, torch.zeros(16, dtype=torch.long)).item() == 1.0
    adv = cls().advantages(rewards, torch.zeros(16, dtype=torch.long))
    assert adv.abs().max().item() == 0.0  # regression: was |A| ~ 0.1 for DAPO before the constant-group rule


def test_singleton_group_is_zero_even_without_eps() -> None:
    # A singleton has std 0; with eps = 0 the plain formula would be 0/0 = NaN, the singleton rule gives 0.
    adv = GRPO(eps=0.0).advantages(torch.tensor([1.0, 0.0, 0.7]), torch.tensor([0, 0, 1]))
    # group 0 [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> A = +-0.5/0.70711 = +-0.70711; group 1 singleton -> 0
    torch.testing.assert_close(adv, torch.tensor([math.sqrt(0.5), -math.sqrt(0.5), 0.0]))


def test_grpo_eps_zero_is_safe_on_zero_variance_group_and_negative_eps_rejected() -> None:
    adv = GRPO(eps=0.0).advantages(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    assert adv.tolist() == [0.0, 0.0]  # regression: was 0/0 = NaN
    with pytest.raises(ValueError, match="eps"):
        DAPO(eps=-1e-6)
    with pytest.raises(ValueError, match="clip_low"):
        GRPO(clip_low=1.0)


# ------------------------------------------------------------------------------------------------
# 2. Aggregation semantics and Normalizer.denominator
# ------------------------------------------------------------------------------------------------
#
# mask (L = 5): row 0 [1, 1, 1, 0, 0] (3 kept), row 1 all masked (0 kept), row 2 [1, 1, 0, 0, 0] (2 kept)
# N = 3, kept tokens 5. Advantages given directly: A = [1, 4, 2]; on-policy so l = -A per kept token.

AGG_MASK = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
AGG_ADV = torch.tensor([1.0, 4.0, 2.0])
AGG_LP = torch.full((3, 5), -0.5)


def test_normalizer_denominators() -> None:
    norm = Normalizer.from_mask(AGG_MASK, max_len=10)
    assert (norm.num_sequences, norm.num_tokens, norm.world_size, norm.max_len) == (3.0, 5.0, 1, 10)
    assert norm.denominator("seq_mean_token_mean") == 3.0  # N, the fully masked row included
    assert norm.denominator("token_mean") == 5.0  # global kept tokens
    assert norm.denominator("seq_mean_token_sum_norm") == 30.0  # L * N = 10 * 3
    # each objective's own aggregation resolves to its paper's denominator
    assert [norm.denominator(cls.aggregation) for cls in ALL_CLASSES] == [3.0, 30.0, 5.0, 3.0]
    assert (GRPO.aggregation, DrGRPO.aggregation, DAPO.aggregation, REINFORCE.aggregation) == (
        "seq_mean_token_mean",
        "seq_mean_token_sum_norm",
        "token_mean",
        "seq_mean_token_mean",
    )
    # all_reduce sums the [num_sequences, num_tokens] counts over ranks (here: another rank with 2 rows, 7 tokens)
    other = torch.tensor([2.0, 7.0], dtype=torch.float64)
    reduced = Normalizer.from_mask(AGG_MASK, max_len=10, all_reduce=lambda c: c + other, world_size=2)
    assert (reduced.num_sequences, reduced.num_tokens, reduced.world_size) == (5.0, 12.0, 2)


def test_grpo_fully_masked_sequence_counts_in_denominator() -> None:
    # per-sequence means: row 0 -1, row 1 (no kept token) 0, row 2 -2 -> (-1 + 0 - 2) / 3 = -1
    # (dropping the empty row from the mean would give -1.5)
    norm = Normalizer.from_mask(AGG_MASK)
    for obj in (GRPO(), REINFORCE()):
        out, grad = _loss_and_grad(obj, AGG_LP, None, AGG_ADV, AGG_MASK, norm)
        assert out.loss.item() == pytest.approx(-1.0)
        # grad -A_i / (n_i * 3): row 0 -1/9, row 1 0 (despite A = 4), row 2 -2/(2*3) = -1/3
        expected = torch.tensor([[-1 / 9, -1 / 9, -1 / 9, 0, 0], [0.0] * 5, [-1 / 3, -1 / 3, 0, 0, 0]])
        torch.testing.assert_close(grad, expected)
    # a micro-batch holding only row 0 still divides by the global N = 3: -1/3 (not -1)
    out = GRPO()(AGG_LP[:1], AGG_LP[:1], None, AGG_ADV[:1], AGG_MASK[:1], norm)
    assert out.loss.item() == pytest.approx(-1 / 3)


def test_dapo_denominator_is_global_kept_tokens() -> None:
    # sum m (-A) = -(3*1 + 0*4 + 2*2) = -7 over 5 kept tokens -> -1.4
    norm = Normalizer.from_mask(AGG_MASK)
    out, grad = _loss_and_grad(DAPO(), AGG_LP, None, AGG_ADV, AGG_MASK, norm)
    assert out.loss.item() == pytest.approx(-1.4)
    torch.testing.assert_close(grad, torch.where(AGG_MASK, -AGG_ADV.unsqueeze(1) / 5, torch.zeros(())))
    # micro-batch of row 0 alone: -3 / 5 (global tokens), not -3 / 3 = -1 (its local token mean)
    out = DAPO()(AGG_LP[:1], AGG_LP[:1], None, AGG_ADV[:1], AGG_MASK[:1], norm)
    assert out.loss.item() == pytest.approx(-0.6)


def test_dr_grpo_denominator_is_constant_len_times_sequences() -> None:
    # -7 / (L * N) = -7 / (10 * 3) -- independent of the padded width 5 and of per-row lengths
    norm = Normalizer.from_mask(AGG_MASK, max_len=10)
    out, grad = _loss_and_grad(DrGRPO(), AGG_LP, None, AGG_ADV, AGG_MASK, norm)
    assert out.loss.item() == pytest.approx(-7 / 30)
    torch.testing.assert_close(grad, torch.where(AGG_MASK, -AGG_ADV.unsqueeze(1) / 30, torch.zeros(())))
    # without the constant L the loss is undefined
    with pytest.raises(ValueError, match="max_len"):
        DrGRPO()(AGG_LP, AGG_LP, None, AGG_ADV, AGG_MASK, Normalizer.from_mask(AGG_MASK))


def test_unknown_aggregation_raises() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        F.aggregate(AGG_LP, AGG_MASK, "seq_sum", Normalizer.from_mask(AGG_MASK))


# ------------------------------------------------------------------------------------------------
# 3. Micro-batch and rank invariance
# ------------------------------------------------------------------------------------------------

INVARIANCE_CASES = [
    pytest.param(GRPO(), id="grpo"),
    pytest.param(GRPO(beta=0.1, dual_clip=3.0), id="grpo-kl-dualclip"),
    pytest.param(DrGRPO(), id="dr_grpo"),
    pytest.param(DrGRPO(beta=0.05), id="dr_grpo-kl"),
    pytest.param(DAPO(), id="dapo"),
    pytest.param(DAPO(dual_clip=2.0, beta=0.1), id="dapo-kl-dualclip"),
    pytest.param(REINFORCE(), id="reinforce"),
]


def _random_batch(seed: int, per_token_adv: bool = False) -> dict[str, Tensor]:
    """N = 8, L = 7: right-padded unequal lengths, interior holes, row 3 fully masked, ratios far from 1."""
    gen = torch.Generator().manual_seed(seed)
    n, length = 8, 7
    lengths = torch.tensor([7, 3, 5, 0, 1, 6, 2, 7])
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)  # [N, L]
    mask &= torch.rand(n, length, generator=gen) > 0.2  # interior holes
    mask[3] = False
    lp = -torch.rand(n, length, generator=gen) * 3.0
    old = lp + 0.4 * torch.randn(n, length, generator=gen)  # ratios well outside [0.8, 1.28]
    ref = lp + 0.3 * torch.randn(n, length, generator=gen)
    adv = torch.randn(n, length, generator=gen) if per_token_adv else torch.randn(n, generator=gen)
    weights = torch.rand(n, length, generator=gen) + 0.5
    return {"lp": lp, "old": old, "ref": ref, "adv": adv, "mask": mask, "weights": weights}


def _grad_over_splits(obj: Objective, b: dict[str, Tensor], norm: Normalizer, splits: list[slice]) -> Tensor:
    """Sum of the gradients of the micro-batches ``splits`` (gradient accumulation)."""
    lp = b["lp"].clone().requires_grad_(True)
    for rows in splits:
        ref = b["ref"][rows] if obj.needs_reference else None
        out = obj(lp[rows], b["old"][rows], ref, b["adv"][rows], b["mask"][rows], norm, b["weights"][rows])
        out.loss.backward()
    assert lp.grad is not None
    return lp.grad


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv[N]", "adv[N,L]"])
@pytest.mark.parametrize("obj", INVARIANCE_CASES)
def test_micro_batch_invariance(obj: Objective, per_token_adv: bool) -> None:
    b = _random_batch(seed=1, per_token_adv=per_token_adv)
    norm = Normalizer.from_mask(b["mask"], max_len=9)  # built once from the full mask
    full = _grad_over_splits(obj, b, norm, [slice(0, 8)])
    assert full.abs().sum() > 0 and (full[~b["mask"]] == 0).all()
    halves = _grad_over_splits(obj, b, norm, [slice(0, 4), slice(4, 8)])
    quarters = _grad_over_splits(obj, b, norm, [slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8)])
    torch.testing.assert_close(halves, full)
    torch.testing.assert_close(quarters, full)
    # The invariance really rests on the global normaliser: per-micro-batch counts give another gradient
    # (token_mean and seq-means divide by local counts; Dr.GRPO by the local number of sequences).
    lp = b["lp"].clone().requires_grad_(True)
    for rows in (slice(0, 4), slice(4, 8)):
        local = Normalizer.from_mask(b["mask"][rows], max_len=9)
        ref = b["ref"][rows] if obj.needs_reference else None
        obj(lp[rows], b["old"][rows], ref, b["adv"][rows], b["mask"][rows], local, b["weights"][rows]).loss.backward()
    assert not torch.allclose(lp.grad, full)


@pytest.mark.parametrize("obj", INVARIANCE_CASES)
def test_two_rank_ddp_average_equals_single_rank(obj: Objective) -> None:
    b = _random_batch(seed=2)
    max_len = 9
    ref_norm = Normalizer.from_mask(b["mask"], max_len=max_len)
    lp1 = b["lp"].clone().requires_grad_(True)
    ref_all = b["ref"] if obj.needs_reference else None
    one_rank = obj(lp1, b["old"], ref_all, b["adv"], b["mask"], ref_norm, b["weights"])
    one_rank.loss.backward()

    # rank k holds rows halves[k]; all_reduce sums both ranks' [num_sequences, num_tokens]
    halves = (slice(0, 4), slice(4, 8))
    counts = [torch.tensor([4.0, float(b["mask"][h].sum())], dtype=torch.float64) for h in halves]
    lp2 = b["lp"].clone().requires_grad_(True)
    rank_losses = []
    for k, rows in enumerate(halves):
        other = counts[1 - k]
        norm = Normalizer.from_mask(b["mask"][rows], max_len=max_len, all_reduce=lambda c, o=other: c + o, world_size=2)
        assert norm == Normalizer(ref_norm.num_sequences, ref_norm.num_tokens, world_size=2, max_len=max_len)
        ref = b["ref"][rows] if obj.needs_reference else None
        out = obj(lp2[rows], b["old"][rows], ref, b["adv"][rows], b["mask"][rows], norm, b["weights"][rows])
        rank_losses.append(out.loss)
    # each rank's loss is x world_size; DDP averages the gradients -> mean of the ranks' losses
    ddp = (rank_losses[0] + rank_losses[1]) / 2
    ddp.backward()
    torch.testing.assert_close(ddp.detach(), one_rank.loss.detach())
    torch.testing.assert_close(lp2.grad, lp1.grad)


# ------------------------------------------------------------------------------------------------
# 4. Dual clip
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("bad", [1.0, 0.5, 0.0, -3.0])
def test_dual_clip_must_exceed_one(cls: type[Objective], bad: float) -> None:
    with pytest.raises(ValueError, match="dual_clip"):
        cls(dual_clip=bad)
    assert cls(dual_clip=1.5).dual_clip == 1.5
    assert cls().dual_clip is None


def test_dual_clip_caps_loss_of_negative_advantage_tokens() -> None:
    # DAPO (eps_low 0.2, eps_high 0.28), per-token advantages [[-1, -1, +1]], ratios [e^2, 2, e^2], on one row:
    #   t0: A = -1, r = e^2 = 7.389: PPO loss -min(-7.389, -1.28) = 7.389 -> dual clip c = 3 caps at -c A = 3, grad 0
    #   t1: A = -1, r = 2: loss -min(-2, -1.28) = 2 < 3, not capped, grad -r A = 2
    #   t2: A = +1, r = e^2: loss -min(7.389, 1.28) = -1.28 (clipped high), grad 0; the dual clip ignores A > 0
    # token_mean over 3: (3 + 2 - 1.28) / 3 = 1.24; grad [0, 2/3, 0]
    old = torch.zeros(1, 3)
    lp = torch.tensor([[2.0, math.log(2.0), 2.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    norm = Normalizer.from_mask(mask)
    out, grad = _loss_and_grad(DAPO(dual_clip=3.0), lp, old, adv, mask, norm)
    assert out.loss.item() == pytest.approx(3.72 / 3, rel=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2 / 3, 0.0]]))
    # without the dual clip: (e^2 + 2 - 1.28) / 3, grad [e^2 / 3, 2/3, 0]
    out, grad = _loss_and_grad(DAPO(), lp, old, adv, mask, norm)
    assert out.loss.item() == pytest.approx((math.exp(2.0) + 0.72) / 3, rel=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[math.exp(2.0) / 3, 2 / 3, 0.0]]))


# ------------------------------------------------------------------------------------------------
# 5. Truncated importance weights and token weights
# ------------------------------------------------------------------------------------------------


def test_truncated_importance_weight_hand_values_and_detached() -> None:
    # log(pi_old / pi_behavior) = [0, -0.5, 1.5, 100 (clamped to 20)]
    # weights = min(exp(.), cap = 2) = [1, e^-0.5 = 0.60653, min(4.4817, 2) = 2, min(e^20, 2) = 2]
    old = torch.tensor([[0.0, -1.0, 0.5, 100.0]], requires_grad=True)
    behavior = torch.tensor([[0.0, -0.5, -1.0, 0.0]], requires_grad=True)
    w = F.truncated_importance_weight(old, behavior, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(-0.5), 2.0, 2.0]]))
    assert not w.requires_grad and w.grad_fn is None
    # a looser cap lets e^1.5 = 4.4817 through; the huge ratio stops at the cap, never inf
    w = F.truncated_importance_weight(old, behavior, cap=10.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(-0.5), math.exp(1.5), 10.0]]))
    assert torch.isfinite(w).all()
    # with a cap above e^20 the log-ratio clamp at 20 is what bounds the weight: e^20 = 4.85e8, not e^100
    w = F.truncated_importance_weight(old, behavior, cap=1e12)
    assert w[0, 3].item() == pytest.approx(math.exp(20.0), rel=1e-5)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_token_weights_scale_the_per_token_loss(cls: type[Objective]) -> None:
    # Weights of 2 everywhere double the loss and the gradient (off-policy batch: clipping active).
    obj = cls()
    adv = obj.advantages(OFF_REWARDS, OFF_GROUPS)
    norm = Normalizer.from_mask(OFF_MASK, max_len=3)
    plain, g_plain = _loss_and_grad(obj, OFF_LP, OFF_OLD, adv, OFF_MASK, norm)
    twice, g_twice = _loss_and_grad(obj, OFF_LP, OFF_OLD, adv, OFF_MASK, norm, weights=torch.full((2, 3), 2.0))
    assert plain.loss.item() != 0.0
    torch.testing.assert_close(twice.loss, 2 * plain.loss)
    torch.testing.assert_close(g_twice, 2 * g_plain)


def test_token_weights_hand_worked_and_kl_unweighted() -> None:
    # GRPO, one sequence, A = 1, on-policy: per-token -1 * w with w = [0.5, 2] -> token mean (-0.5 - 2)/2 = -1.25
    lp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    norm = Normalizer.from_mask(mask)
    out, grad = _loss_and_grad(GRPO(), lp, None, torch.ones(1), mask, norm, weights=torch.tensor([[0.5, 2.0]]))
    assert out.loss.item() == pytest.approx(-1.25)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -1.0]]))  # -w_t / 2
    # With beta = 0.5 and ref = lp - 1 on each token: k3 = e^-1 - (-1) - 1 = e^-1 per token.
    # The weights multiply the surrogate only (TRL/verl order: IS weight, then + beta KL):
    # loss = -1.25 + 0.5 * e^-1
    out, _ = _loss_and_grad(GRPO(beta=0.5), lp, None, torch.ones(1), mask, norm, lp - 1.0, torch.tensor([[0.5, 2.0]]))
    assert out.loss.item() == pytest.approx(-1.25 + 0.5 * math.exp(-1.0), rel=1e-6)
    assert out.metrics["objective/kl"].item() == pytest.approx(math.exp(-1.0), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# 6. zero_std_group_fraction
# ------------------------------------------------------------------------------------------------


def test_zero_std_group_fraction_hand_values() -> None:
    # groups 0: [1, 0] varied; 1: [0.5, 0.5, 0.5] constant; 2: [0, 1] varied -> 1 of 3 = 1/3
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert F.zero_std_group_fraction(rewards, groups).item() == pytest.approx(1 / 3)
    # floating noise: 0.3 vs 0.3 + 1e-7 differ by ~1e-7 <= tol 1e-6 -> constant; group 5 [1, 0] varied;
    # group 6 [0.25, 0.25] constant; a singleton (group 8) is constant too -> 3 of 4
    rewards = torch.tensor([0.3, 0.3 + 1e-7, 1.0, 0.0, 0.25, 0.25, 0.9])
    groups = torch.tensor([4, 4, 5, 5, 6, 6, 8])
    assert F.zero_std_group_fraction(rewards, groups).item() == pytest.approx(3 / 4)
    # a spread of 1e-3 is a real difference; tol = 0 makes the noisy group count as varied
    assert F.zero_std_group_fraction(torch.tensor([0.3, 0.301]), torch.tensor([0, 0])).item() == 0.0
    assert F.zero_std_group_fraction(rewards, groups, tol=0.0).item() == pytest.approx(2 / 4)
    assert F.zero_std_group_fraction(torch.zeros(0), torch.zeros(0, dtype=torch.long)).item() == 0.0


# ------------------------------------------------------------------------------------------------
# 7. OverlongPenalty (DAPO Eq. 13)
# ------------------------------------------------------------------------------------------------


def _zeros(completions: list[str], answers: list[str], **columns: object) -> list[float]:
    return [0.0] * len(completions)


def test_overlong_penalty_hand_values() -> None:
    # L_max = 100, L_cache = 0.2 * 100 = 20, soft band (80, 100]
    #   50 -> 0; 80 -> 0 (band starts after 80); 90 -> (80 - 90)/20 = -0.5; 95 -> -15/20 = -0.75;
    #   100 -> (80 - 100)/20 = -1; 101, 150 -> -1 (beyond L_max)
    lengths = [50, 80, 90, 95, 100, 101, 150]
    expected = [0.0, 0.0, -0.5, -0.75, -1.0, -1.0, -1.0]
    n = len(lengths)
    by_column = OverlongPenalty(reward_fn=_zeros)
    out = by_column(["x"] * n, ["y"] * n, completion_tokens=lengths, max_new_tokens=[100] * n)
    assert out == pytest.approx(expected)
    # max_tokens given explicitly wins over the column (column says 50: would make everything -1 or in-band)
    fixed = OverlongPenalty(reward_fn=_zeros, max_tokens=100)
    assert fixed(["x"] * n, ["y"] * n, completion_tokens=lengths, max_new_tokens=[50] * n) == pytest.approx(expected)
    assert fixed(["x"] * n, ["y"] * n, completion_tokens=lengths) == pytest.approx(expected)
    # factor scales the penalty: 90 -> 0.5 * -0.5 = -0.25; beyond -> -0.5
    half = OverlongPenalty(reward_fn=_zeros, factor=0.5, max_tokens=100)
    assert half(["x"] * 3, ["y"] * 3, completion_tokens=[10, 90, 120]) == pytest.approx([0.0, -0.25, -0.5])
    # non-integral cache: L_max = 10, fraction 0.25 -> L_cache = 2.5, band (7.5, 10]: 7 -> 0, 8 -> -0.5/2.5 = -0.2
    frac = OverlongPenalty(reward_fn=_zeros, cache_fraction=0.25)
    assert frac.penalty(7, 10) == 0.0
    assert frac.penalty(8, 10) == pytest.approx(-0.2)
    assert frac.penalty(11, 10) == -1.0


def test_overlong_penalty_on_math_reward() -> None:
    # base: "\boxed{5}" vs "5" = 1.0, "\boxed{4}" = 0.0; L_max = 100 (column), lengths 90, 10, 120
    # -> [1.0 + (80 - 90)/20, 0.0 + 0, 1.0 - 1] = [0.5, 0.0, 0.0]
    shaped = OverlongPenalty()  # default reward_fn is math_reward
    completions = ["\\boxed{5}", "\\boxed{4}", "so \\boxed{5}"]
    answers = ["5", "5", "5"]
    assert math_reward(completions, answers) == [1.0, 0.0, 1.0]
    out = shaped(completions, answers, completion_tokens=[90, 10, 120], max_new_tokens=[100, 100, 100])
    assert out == pytest.approx([0.5, 0.0, 0.0])
    assert shaped.__name__ == "OverlongPenalty(math_reward)"


def test_overlong_penalty_errors() -> None:
    shaped = OverlongPenalty(reward_fn=_zeros)
    with pytest.raises(ValueError, match="completion_tokens"):
        shaped(["x"], ["y"], max_new_tokens=[100])
    with pytest.raises(ValueError, match="max_tokens"):
        shaped(["x"], ["y"], completion_tokens=[10])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="cache_fraction"):
            OverlongPenalty(cache_fraction=bad)


# ------------------------------------------------------------------------------------------------
# 8. API: names, defaults, needs_reference, validation
# ------------------------------------------------------------------------------------------------


def test_public_names() -> None:
    assert {"GRPO", "DrGRPO", "DAPO", "REINFORCE", "Normalizer", "LossOutput", "Objective"} <= set(objectives.__all__)
    for cls in ALL_CLASSES:
        assert getattr(objectives, cls.__name__) is cls
        assert issubclass(cls, Objective)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_needs_reference_iff_beta_positive(cls: type[Objective]) -> None:
    assert cls().needs_reference is False
    assert cls(beta=0.0).needs_reference is False
    assert cls(beta=1e-3).needs_reference is True
    assert cls().uses_clipping is True
    mask = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logprobs"):
        cls(beta=0.1)(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.ones(1), mask, Normalizer.from_mask(mask, 4))


def test_defaults() -> None:
    dapo = DAPO()
    assert (dapo.clip_low, dapo.clip_high, dapo.eps, dapo.beta, dapo.dual_clip) == (0.2, 0.28, 1e-6, 0.0, None)
    grpo = GRPO()
    assert (grpo.clip_low, grpo.clip_high, grpo.eps, grpo.beta, grpo.scale_rewards) == (0.2, 0.2, 1e-4, 0.0, True)
    dr = DrGRPO()
    assert (dr.clip_low, dr.clip_high, dr.beta, dr.max_len, dr.scale_rewards) == (0.2, 0.2, 0.0, None, False)
    assert DrGRPO(max_len=1024).max_len == 1024
    rf = REINFORCE()
    assert (rf.clip_low, rf.clip_high, rf.beta, rf.use_baseline) == (0.2, 0.2, 0.0, False)


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"clip_low": -0.1}, "clip_low"), ({"clip_high": -0.01}, "clip_high"), ({"beta": -1.0}, "beta")],
)
def test_invalid_args_raise(cls: type[Objective], kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("bad", [0, -5])
def test_dr_grpo_max_len_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="max_len"):
        DrGRPO(max_len=bad)
