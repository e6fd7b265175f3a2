"""The collapse detector's signals: running statistics of a few logged metrics and their alarm
tests.

Pure Python over one step's metric values at a time, so each test is checked on hand-made sequences.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from capo_lightning import keys

METRICS = {
    "reward": keys.REWARD_MEAN,
    "entropy": keys.ENTROPY,
    "truncated": keys.TRUNCATED_FRAC,
    "length": keys.RESPONSE_LENGTH_MEAN,
    "grad_norm": keys.GRAD_NORM,
    "kl": keys.KL,
    "reject": keys.TOKEN_REJECT_RATE,
}  # signal input -> logged key


@dataclass
class Reading:
    """One signal over its threshold at one step."""

    signal: str
    value: float
    threshold: float
    message: str


@dataclass
class Thresholds:
    """When each signal fires; None switches a signal off. See :class:`CollapseDetector` for the
    meaning."""

    reward_drop: float | None = 0.5
    min_peak_reward: float = 0.1
    entropy_ratio: float | None = 0.1
    entropy_rise: float | None = 1.5
    truncated_max: float | None = 0.9
    min_length: float | None = 1.5
    grad_spike: float | None = 10.0
    grad_window: int = 20
    reject_max: float | None = 0.5
    kl_max: float | None = 1.0


@dataclass
class SignalState:
    """Running statistics: EMAs, the reward peak, the entropy reference and recent gradient
    norms."""

    steps: int = 0
    ema: dict[str, float] = field(default_factory=dict)
    reward_peak: float | None = None
    entropy_start: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)


class Signals:
    """Feeds one step's metric values into the running statistics and returns the signals over
    threshold.

    Smoothed (EMA with weight ``ema`` on the new value): reward, entropy, truncated fraction,
    length, KL. Raw: gradient norm (against the median of the non-zero norms of the previous
    ``grad_window`` steps: a step whose advantages were all 0 has no gradient, and any gradient
    would be a "spike" against it) and rejection rate.
    No signal is judged during the first ``warmup_steps`` steps; the statistics still fill. The
    entropy reference is the mean entropy of those warm-up steps.
    """

    def __init__(self, thresholds: Thresholds, warmup_steps: int = 5, ema: float = 0.3) -> None:
        if not 0 < ema <= 1:
            raise ValueError(f"CollapseDetector.ema must be in (0, 1], got {ema}")
        if warmup_steps < 1 or thresholds.grad_window < 1:
            raise ValueError(
                "CollapseDetector needs warmup_steps >= 1 and grad_window >= 1, got "
                f"{warmup_steps}, {thresholds.grad_window}"
            )
        self.thresholds, self.warmup_steps, self.alpha = thresholds, warmup_steps, ema
        self.state = SignalState()

    @property
    def judging(self) -> bool:
        """Whether the latest step was judged (the warm-up is over)."""
        return self.state.steps > self.warmup_steps

    def reset(self) -> None:
        """Forget everything (after a rollback: the restored policy starts a new warm-up)."""
        self.state = SignalState()

    def update(self, values: dict[str, float]) -> list[Reading]:
        """Add one step (keys of :data:`METRICS`, missing ones skipped) and return the signals that
        fire."""
        state, alpha = self.state, self.alpha
        state.steps += 1
        for name in ("reward", "entropy", "truncated", "length", "kl"):
            if name in values:
                previous = state.ema.get(name, values[name])
                state.ema[name] = alpha * values[name] + (1 - alpha) * previous
        judged = state.steps > self.warmup_steps
        readings = self._judge(values) if judged else []
        if "reward" in state.ema and (judged or state.steps == self.warmup_steps):
            state.reward_peak = max(state.reward_peak or state.ema["reward"], state.ema["reward"])
        if "entropy" in values and not judged:
            state.entropy_start.append(values["entropy"])
        if "grad_norm" in values:
            state.grad_norms = (state.grad_norms + [values["grad_norm"]])[
                -self.thresholds.grad_window :
            ]
        return readings

    def _judge(self, values: dict[str, float]) -> list[Reading]:
        """This step's readings over threshold: first those against the run's own reference (the
        reward peak, the warm-up entropy), then those against fixed limits or recent steps."""
        return [*self._reference_readings(), *self._limit_readings(values)]

    def _reference_readings(self) -> list[Reading]:
        t, state, ema = self.thresholds, self.state, self.state.ema
        found: list[Reading] = []
        peak = state.reward_peak
        if t.reward_drop is not None and peak is not None and peak >= t.min_peak_reward:
            found += _below(
                "reward_drop",
                ema.get("reward"),
                (1 - t.reward_drop) * peak,
                f"smoothed reward (peak {peak:.3g})",
            )
        start = statistics.fmean(state.entropy_start) if state.entropy_start else None
        if t.entropy_ratio is not None and start is not None:
            found += _below(
                "entropy_collapse",
                ema.get("entropy"),
                t.entropy_ratio * start,
                f"smoothed entropy (start {start:.3g})",
            )
        if t.entropy_rise is not None and start is not None:
            found += _above(
                "entropy_rise",
                ema.get("entropy"),
                t.entropy_rise * start,
                f"smoothed entropy (start {start:.3g})",
            )
        return found

    def _limit_readings(self, values: dict[str, float]) -> list[Reading]:
        t, state, ema = self.thresholds, self.state, self.state.ema
        found: list[Reading] = []
        if t.truncated_max is not None:
            found += _above(
                "length_cap",
                ema.get("truncated"),
                t.truncated_max,
                "smoothed share truncated at max_new_tokens",
            )
        if t.min_length is not None:
            found += _below(
                "length_floor", ema.get("length"), t.min_length, "smoothed response length (tokens)"
            )
        # steps whose advantages were all 0 have no gradient
        moving = [g for g in state.grad_norms if g > 0]
        if (
            t.grad_spike is not None
            and moving
            and len(state.grad_norms) >= min(self.warmup_steps, t.grad_window)
        ):
            median = statistics.median(moving)
            found += _above(
                "grad_spike",
                values.get("grad_norm"),
                t.grad_spike * median,
                f"gradient norm (recent median {median:.3g})",
            )
        if t.reject_max is not None:
            found += _above(
                "reject_spike", values.get("reject"), t.reject_max, "token rejection rate"
            )
        if t.kl_max is not None:
            found += _above("kl", ema.get("kl"), t.kl_max, "smoothed KL to the reference")
        return found


def _below(signal: str, value: float | None, floor: float, what: str) -> list[Reading]:
    """The reading of ``signal`` when ``value`` is under ``floor``, else none."""
    if value is not None and value < floor:
        return [Reading(signal, value, floor, f"{what} {value:.3g} < {floor:.3g}")]
    return []


def _above(signal: str, value: float | None, limit: float, what: str) -> list[Reading]:
    """The reading of ``signal`` when ``value`` is over ``limit``, else none."""
    if value is not None and value > limit:
        return [Reading(signal, value, limit, f"{what} {value:.3g} > {limit:.3g}")]
    return []


class Streaks:
    """How many steps in a row each signal has fired; a signal raises an alarm on its
    ``patience``-th step."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"CollapseDetector.patience must be >= 1, got {patience}")
        self.patience = patience
        self.counts: dict[str, int] = {}

    def update(self, readings: list[Reading]) -> list[Reading]:
        """Count this step's readings (a signal that did not fire starts over) and return the new
        alarms."""
        self.counts = {r.signal: self.counts.get(r.signal, 0) + 1 for r in readings}
        return [r for r in readings if self.counts[r.signal] == self.patience]

    def reset(self) -> None:
        self.counts = {}


def replay(
    rows: list[dict[str, float]],
    thresholds: Thresholds | None = None,
    warmup_steps: int = 5,
    ema: float = 0.3,
    patience: int = 2,
) -> list[tuple[int, Reading]]:
    """The alarms a ``warn`` detector would raise over logged step metrics (one dict
    of :data:`METRICS` keys per optimizer step, in order): ``(0-based step index, reading)``. Judges
    runs logged under other detector settings, or none, by today's signals, e.g.
    ``scripts/study_table.py``."""
    signals, streaks = Signals(thresholds or Thresholds(), warmup_steps, ema), Streaks(patience)
    alarms = []
    for index, row in enumerate(rows):
        values = {name: row[key] for name, key in METRICS.items() if row.get(key) is not None}
        alarms += [(index, reading) for reading in streaks.update(signals.update(values))]
    return alarms
