"""Smoothing rules (EMA, trailing window in completions) and the paper's sample efficiency with its bootstrap.

Run: ``pytest tests/unit/test_efficiency.py``. Expected numbers are worked out by hand in the comments, or
recomputed here from the documented procedure; none is read back from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from capo_lightning.report.curves import DEFAULT_SMOOTHING, EMA, Window, aggregate, masked_key
from capo_lightning.report.efficiency import crossing, mean_curve, sample_efficiency, target_of


def steps(per_step: float, values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A run of equal steps: x = per_step, 2 per_step, ...; y as given."""
    return per_step * np.arange(1, len(values) + 1, dtype=float), np.array(values, dtype=float)


# --- smoothing rules ---


def test_window_weights_steps_by_their_completions() -> None:
    x = np.array([10.0, 40.0, 50.0, 100.0, 110.0])  # steps of 10, 30, 10, 50, 10 completions
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = [
        1.0,  # x 10: only itself
        (10 * 1 + 30 * 2) / 40,  # x 40: rows with x > -24 -> 10, 40
        (10 * 1 + 30 * 2 + 10 * 3) / 50,  # x 50: x > -14 -> 10, 40, 50
        (30 * 2 + 10 * 3 + 50 * 4) / 90,  # x 100: x > 36 -> 40, 50, 100
        (10 * 3 + 50 * 4 + 10 * 5) / 70,  # x 110: x > 46 -> 50, 100, 110
    ]
    assert Window(64.0).smooth(x, y) == pytest.approx(expected, rel=1e-12)


def test_window_of_64_averages_four_steps_of_16_and_leaves_steps_of_192_alone() -> None:
    x, y = steps(16.0, [1, 2, 3, 4, 5, 6, 7, 8])
    # at x = 80 the window is x > 16: steps 2..5 (x = 16 itself is out); early points average what exists
    assert Window(64.0).smooth(x, y) == pytest.approx([1, 1.5, 2, 2.5, 3.5, 4.5, 5.5, 6.5], rel=1e-12)
    x, y = steps(192.0, [0.3, 0.1, 0.7, 0.2])
    assert Window(64.0).smooth(x, y).tolist() == y.tolist()


def test_window_takes_the_last_row_of_a_repeated_x() -> None:
    # x 32 logged twice: one step of 32 completions whose value is the last row's (1); x 64: (32*1 + 32*3) / 64
    smoothed = Window(64.0).smooth(np.array([32.0, 32.0, 64.0]), np.array([9.0, 1.0, 3.0]))
    assert smoothed.tolist() == [1.0, 1.0, 2.0]


def test_rules_validate_and_describe_themselves() -> None:
    assert Window(64.0).description == "trailing window of 64 completions"
    assert EMA(0.35).description == "EMA α 0.35" and EMA(1.0).description == "no smoothing"
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="window"):
            Window(bad)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            EMA(bad)


def test_defaults_window_training_accuracy_and_keep_the_other_alphas() -> None:
    assert DEFAULT_SMOOTHING["train/accuracy"] == Window(64.0) == DEFAULT_SMOOTHING["train/reward_mean"]
    assert DEFAULT_SMOOTHING["val/accuracy"] == EMA(1.0)
    for key in ("curvature/global_fisher", masked_key("curvature/global_fisher"), "select/token_reject_rate"):
        assert DEFAULT_SMOOTHING[key] == EMA(0.35)
    assert DEFAULT_SMOOTHING["objective/entropy"] == EMA(0.35)


def test_aggregate_takes_a_rule_or_an_alpha_and_names_it() -> None:
    first, second = steps(16.0, [0.0, 0.4, 0.8, 0.4, 0.0]), steps(16.0, [0.2, 0.2, 0.2, 0.6, 1.0])
    curve = aggregate([first, second], Window(32.0))  # two steps of 16: the mean of a step and the one before
    hand = [(0.0 + 0.2) / 2, (0.2 + 0.2) / 2, (0.6 + 0.2) / 2, (0.6 + 0.4) / 2, (0.2 + 0.8) / 2]
    assert curve.mean == pytest.approx(hand, rel=1e-12)
    assert curve.ema is None and curve.window == 32.0 and curve.smoothing == "trailing window of 32 completions"
    curve = aggregate([first, second], 0.5)  # a number is an EMA alpha
    assert curve.ema == 0.5 and curve.window is None and curve.smoothing == "EMA α 0.5"
    assert curve.mean[1] == pytest.approx(((0.5 * 0.4 + 0.5 * 0.0) + (0.5 * 0.2 + 0.5 * 0.2)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="one smoothing rule"):
        aggregate([first], Window(64.0), alpha=0.5)


# --- crossing ---


def test_touching_and_falling_back_within_sustain_is_no_crossing() -> None:
    x = 16.0 * np.arange(1, 8)  # 16 .. 112
    y = np.array([0.1, 0.5, 0.3, 0.2, 0.5, 0.6, 0.7])
    # x 32 reaches 0.5 but x 48 (within 32) falls to 0.3; x 80 reaches it and x 96, 112 hold it
    assert crossing(x, y, 0.5, sustain=32.0) == 80.0
    assert crossing(x, y, 0.5, sustain=0.0) == 32.0  # nothing to hold: the first touch
    # a fall later than the sustain window does not undo a crossing
    assert crossing(x[:4], np.array([0.6, 0.6, 0.6, 0.1]), 0.5, sustain=32.0) == 16.0


def test_crossing_at_the_last_point_counts_and_never_is_none() -> None:
    x = np.array([10.0, 20.0, 30.0])
    assert crossing(x, np.array([0.1, 0.2, 0.7]), 0.5, sustain=64.0) == 30.0
    assert crossing(x, np.array([0.1, 0.6, 0.4]), 0.5, sustain=64.0) is None
    assert crossing(x, np.array([0.1, 0.2, 0.3]), 0.5, sustain=64.0) is None
    assert crossing(np.array([]), np.array([]), 0.5, sustain=64.0) is None
    with pytest.raises(ValueError, match="sustain"):
        crossing(x, np.array([0.1, 0.2, 0.7]), 0.5, sustain=-1.0)


# --- sample efficiency ---

OFFSETS = (-1 / 64, 0.0, 1 / 64)  # per seed, exact in binary; their mean is 0


def reference_runs() -> list[tuple[np.ndarray, np.ndarray]]:
    """3 runs of 10 steps of 192 rising i / 16 (+ offset): the window of 64 leaves them alone; final mean 0.625."""
    return [steps(192.0, [i / 16 + offset for i in range(1, 11)]) for offset in OFFSETS]


def fast_runs(offsets: tuple[float, ...] = (-0.05, 0.0, 0.05)) -> list[tuple[np.ndarray, np.ndarray]]:
    """3 runs of 12 steps of 16: 0 for 5 steps, then 1 (+ offset)."""
    return [steps(16.0, [0.0] * 5 + [1.0 + offset] * 7) for offset in offsets]


def test_sample_efficiency_of_a_fast_arm_by_hand() -> None:
    # target: the reference's mean at 1920 completions, 10/16 = 0.625. The arm's window of 4 steps: at 112
    # (step 7) 2 of 4 steps at ~1 -> 0.5 (< 0.625), at 128 (step 8) 3 of 4 -> 0.75, held -> 1920 / 128 = 15x.
    # Every resample keeps that: target 0.625 +- 1/64, arm 0.5 +- 0.025 at 112 and 0.75 +- 0.0375 from 128
    found = sample_efficiency(fast_runs(), reference_runs(), Window(64.0), sustain=64.0, n_boot=500, seed=1)
    assert found.target == pytest.approx(0.625, rel=1e-12) and found.reference_completions == 1920.0
    assert found.crossing == 128.0 and found.ratio == pytest.approx(15.0, rel=1e-12)
    assert found.interval == pytest.approx((15.0, 15.0), rel=1e-12) and found.never_fraction == 0.0
    assert found.smoothing == "trailing window of 64 completions" and found.n_boot == 500
    assert target_of(reference_runs(), Window(64.0)) == (pytest.approx(0.625, rel=1e-12), 1920.0)


def test_an_arm_that_never_reaches_the_target_is_never() -> None:
    slow = [steps(16.0, [0.1 + offset] * 12) for offset in (0.0, 0.1, 0.2)]  # at most 0.3 < 0.625 - 1/64
    found = sample_efficiency(slow, reference_runs(), Window(64.0), sustain=64.0, n_boot=300)
    assert found.crossing is None and found.ratio is None
    assert found.never_fraction == 1.0 and found.interval == (0.0, 0.0)


def test_identical_arm_and_reference_give_one_and_the_reference_is_at_least_one() -> None:
    found = sample_efficiency(reference_runs(), reference_runs(), Window(64.0), sustain=64.0, n_boot=200)
    assert found.ratio == 1.0 and found.crossing == found.reference_completions == 1920.0
    rng = np.random.default_rng(5)
    for _ in range(5):  # noisy, non-monotone curves: the reference crosses its own final value at the latest there
        runs = [steps(16.0, rng.uniform(0, 1, 20).tolist()) for _ in range(3)]
        found = sample_efficiency(runs, runs, Window(64.0), sustain=64.0, n_boot=20)
        assert found.ratio is not None and found.ratio >= 1.0


def replayed_bootstrap(arm, reference, rule, sustain, n_boot, seed) -> tuple[np.ndarray, np.ndarray]:
    """The documented bootstrap written out: per draw the arm's indices, then the reference's, from one
    ``default_rng(seed)``; target, crossing and ratio recomputed from the resampled runs; never counts 0."""
    rng = np.random.default_rng(seed)
    ratios, never = [], []
    for _ in range(n_boot):
        arm_pick = [arm[i] for i in rng.integers(0, len(arm), len(arm))]
        reference_pick = [reference[i] for i in rng.integers(0, len(reference), len(reference))]
        target, completions = target_of(reference_pick, rule)
        crossed = crossing(*mean_curve(arm_pick, rule), target, sustain)
        never.append(crossed is None)
        ratios.append(0.0 if crossed is None else completions / crossed)
    return np.array(ratios), np.array(never)


def test_bootstrap_is_deterministic_and_matches_the_documented_procedure() -> None:
    # arms whose seeds differ in speed: the crossing and the target move from resample to resample
    reference = [steps(32.0, np.linspace(0.1, top, 8).tolist()) for top in (0.5, 0.6, 0.7)]
    arm = [steps(32.0, np.linspace(0.2, top, 8).tolist()) for top in (0.55, 0.75, 0.95)]
    rule = Window(64.0)
    found = sample_efficiency(arm, reference, rule, sustain=64.0, n_boot=400, seed=7)
    assert found == sample_efficiency(arm, reference, rule, sustain=64.0, n_boot=400, seed=7)
    ratios, never = replayed_bootstrap(arm, reference, rule, 64.0, 400, 7)
    assert found.interval == pytest.approx(tuple(np.percentile(ratios, [2.5, 97.5])), rel=1e-12)
    assert found.never_fraction == pytest.approx(never.mean())
    assert 0.0 < found.never_fraction < 1.0 and found.interval[0] < found.interval[1]  # the draws do differ
    assert found.interval[0] <= found.ratio <= found.interval[1]
    # the point estimate, by hand. Two steps of 32 per window. The reference's raw mean rises 0.5 / 7 per step
    # from 0.1 to 0.6 at step 8 (256 completions): target = (0.1 + 0.5 * 6 / 7 + 0.6) / 2 = 0.5643. The arm's
    # rises 0.55 / 7 per step from 0.2: smoothed 0.2 + 0.55 / 7 * (k - 1.5) at step k >= 2, 0.5536 at k = 6,
    # 0.6321 at k = 7 and rising -> crossing at 224 completions, 256 / 224
    target = (0.1 + 0.5 * 6 / 7 + 0.6) / 2
    assert 0.2 + 0.55 / 7 * 4.5 < target <= 0.2 + 0.55 / 7 * 5.5
    assert found.target == pytest.approx(target, rel=1e-12) and found.crossing == 224.0
    assert found.ratio == pytest.approx(256 / 224, rel=1e-12)
    assert mean_curve(arm, rule)[1] == pytest.approx(aggregate(arm, rule).mean, rel=1e-15)


def test_sample_efficiency_refuses_empty_arms_and_no_draws() -> None:
    with pytest.raises(ValueError, match="at least one run"):
        sample_efficiency([], reference_runs(), Window(64.0), sustain=64.0)
    with pytest.raises(ValueError, match="n_boot"):
        sample_efficiency(fast_runs(), reference_runs(), Window(64.0), sustain=64.0, n_boot=0)
