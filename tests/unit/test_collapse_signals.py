"""The collapse detector's signals on hand-made metric sequences, with the firing steps worked out by hand."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from capo_lightning.callbacks.collapse_signals import Reading, Signals, Streaks, Thresholds, replay
from tests.helpers import SIGNALS_OFF as OFF


def _only(**on) -> Thresholds:
    return Thresholds(**{**OFF, **on})


def _fire_steps(signals: Signals, sequence: list[dict[str, float]]) -> list[tuple[int, list[str]]]:
    out = []
    for step, values in enumerate(sequence, start=1):
        readings = signals.update(values)
        if readings:
            out.append((step, sorted(r.signal for r in readings)))
    return out


def test_steady_training_fires_nothing() -> None:
    values = dict(reward=0.5, entropy=1.5, truncated=0.2, length=30.0, grad_norm=1.0, reject=0.05)
    assert _fire_steps(Signals(Thresholds(), warmup_steps=5), [{**values, "kl": 0.05}] * 40) == []


def test_reward_drop_fires_when_the_ema_falls_below_half_its_peak() -> None:
    # ema stays 0.5 through warm-up (peak 0.5); then 0.35 (step 6), 0.245 < 0.25 (step 7) ...
    signals = Signals(_only(reward_drop=0.5), warmup_steps=5, ema=0.3)
    steps = _fire_steps(signals, [{"reward": 0.5}] * 5 + [{"reward": 0.0}] * 3)
    assert steps == [(7, ["reward_drop"]), (8, ["reward_drop"])]
    (reading,) = signals.update({"reward": 0.0})
    assert reading.threshold == pytest.approx(0.25) and reading.value == pytest.approx(0.5 * 0.7**4)


def test_reward_drop_needs_a_peak_worth_losing() -> None:
    signals = Signals(_only(reward_drop=0.5, min_peak_reward=0.1), warmup_steps=5)
    assert _fire_steps(signals, [{"reward": 0.05}] * 5 + [{"reward": 0.0}] * 10) == []


def test_entropy_collapse_is_relative_to_the_warm_up_mean() -> None:
    # start 2.0; after it the ema is 0.1 + 1.9 * 0.7^k, below 0.1 * 2.0 once 1.9 * 0.7^k < 0.1
    first_k = math.floor(math.log(0.1 / 1.9) / math.log(0.7)) + 1
    signals = Signals(_only(entropy_ratio=0.1), warmup_steps=5, ema=0.3)
    steps = _fire_steps(signals, [{"entropy": 2.0}] * 5 + [{"entropy": 0.1}] * 12)
    assert steps[0] == (5 + first_k, ["entropy_collapse"])
    assert [s for s, _ in steps] == list(range(5 + first_k, 18))


def test_entropy_rise_is_relative_to_the_warm_up_mean() -> None:
    # start 2.0; then entropy 4.0: ema = 4 - 2 * 0.7^k > 1.5 * 2.0 = 3.0 once 0.7^k < 0.5, i.e. k = 2 (step 7)
    signals = Signals(_only(entropy_rise=1.5), warmup_steps=5, ema=0.3)
    steps = _fire_steps(signals, [{"entropy": 2.0}] * 5 + [{"entropy": 4.0}] * 4)
    assert steps == [(7, ["entropy_rise"]), (8, ["entropy_rise"]), (9, ["entropy_rise"])]
    falling = Signals(_only(entropy_rise=1.5), warmup_steps=5, ema=0.3)
    assert _fire_steps(falling, [{"entropy": 2.0}] * 5 + [{"entropy": 0.5}] * 10) == []


def test_streaks_raise_one_alarm_per_unbroken_run_of_patience_steps() -> None:
    streaks = Streaks(patience=2)
    fired = [[], ["a"], ["a", "b"], ["a", "b"], ["b"], [], ["a"], ["a"]]
    alarms = [sorted(r.signal for r in streaks.update([_reading(n) for n in names])) for names in fired]
    assert alarms == [[], [], ["a"], ["b"], [], [], [], ["a"]]
    with pytest.raises(ValueError, match="patience"):
        Streaks(0)


def _reading(signal: str) -> Reading:
    return Reading(signal, 1.0, 0.0, "")


def _train_rows(run: str) -> list[dict[str, float]]:
    path = Path(__file__).resolve().parents[2] / "docs/study/regimes" / run / "metrics.csv"
    rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(path.open())]
    return [r for r in rows if "train/reward_mean" in r]


def test_replay_flags_the_study_runs_whose_entropy_exploded_and_spares_the_healthy_one() -> None:
    # committed runs of the regime study: CAPO with the paper's thresholds went from entropy 1.8 to 4.5 with
    # reward 0 and no detector signal at the time (it has no reward peak to lose, answers stayed under the cap)
    (alarm,) = replay(_train_rows("aggressive_capo_s0"))
    assert alarm[1].signal == "entropy_rise" and 5 <= alarm[0] < 12
    assert replay(_train_rows("conservative_grpo_s0")) == []


def test_gradient_spike_is_against_the_recent_median() -> None:
    signals = Signals(_only(grad_spike=10.0), warmup_steps=3)
    # 9.9 at step 6: limit 10 x median(1, 2, 1, 1.5, 1) = 10; 10.1 at step 7: limit 10 x median(..., 9.9) = 12.5
    norms = [1.0, 2.0, 1.0, 1.5, 1.0, 9.9, 10.1, 1.0]
    assert _fire_steps(signals, [{"grad_norm": g} for g in norms]) == []
    spike = Signals(_only(grad_spike=10.0), warmup_steps=3)
    assert _fire_steps(spike, [{"grad_norm": g} for g in [1.0] * 5 + [10.5]]) == [(6, ["grad_spike"])]


def test_length_signals_and_rejection_are_judged_after_warm_up_only() -> None:
    signals = Signals(_only(truncated_max=0.9, min_length=1.5, reject_max=0.5), warmup_steps=3)
    sequence = [{"truncated": 1.0, "length": 1.0, "reject": 0.9}] * 4
    assert _fire_steps(signals, sequence) == [(4, ["length_cap", "length_floor", "reject_spike"])]
    calm = Signals(_only(reject_max=0.5), warmup_steps=1)
    assert _fire_steps(calm, [{"reject": 0.4}, {"reject": 0.6}]) == [(2, ["reject_spike"])]


def test_kl_fires_over_its_limit_when_a_reference_logs_it() -> None:
    # only objectives with a reference (beta > 0) log objective/kl; without it the signal stays silent
    assert _fire_steps(Signals(Thresholds(**OFF), warmup_steps=1), [{"reward": 0.5}] * 3) == []
    assert _fire_steps(Signals(Thresholds(**OFF), warmup_steps=1, ema=1.0), [{"kl": 0.5}, {"kl": 1.5}]) == [
        (2, ["kl"])
    ]  # the default limit is 1.0 nat per token
    assert _fire_steps(Signals(_only(kl_max=None), warmup_steps=1), [{"kl": 5.0}] * 3) == []


def test_reset_starts_a_new_warm_up() -> None:
    signals = Signals(_only(min_length=1.5), warmup_steps=2, ema=1.0)
    assert _fire_steps(signals, [{"length": 1.0}] * 3) == [(3, ["length_floor"])]
    signals.reset()
    assert _fire_steps(signals, [{"length": 1.0}] * 2) == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ema"):
        Signals(Thresholds(), ema=0.0)
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        Signals(Thresholds(), warmup_steps=0)
    with pytest.raises(ValueError, match="grad_window >= 1"):
        Signals(Thresholds(grad_window=0))


def test_gradient_spike_is_judged_when_the_window_is_shorter_than_the_warm_up() -> None:
    signals = Signals(_only(grad_spike=10.0, grad_window=3), warmup_steps=6)
    assert _fire_steps(signals, [{"grad_norm": g} for g in [1.0] * 6 + [20.0]]) == [(7, ["grad_spike"])]


def test_steps_without_a_gradient_do_not_make_every_gradient_a_spike() -> None:
    # a study run: rewards all 0 for a while (grad norm exactly 0), then an ordinary gradient again
    signals = Signals(_only(grad_spike=10.0), warmup_steps=3)
    norms = [1.0, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 1.4, 13.0]
    assert _fire_steps(signals, [{"grad_norm": g} for g in norms]) == [
        (9, ["grad_spike"])
    ]  # 13 > 10 x median(1, 1.2, 1.4)
    silent = Signals(_only(grad_spike=10.0), warmup_steps=3)
    assert _fire_steps(silent, [{"grad_norm": g} for g in [0.0] * 6 + [1.5]]) == []
