"""A run's selector as its description names it: masking or measuring, the thresholds that ran
(configured, or calibrated: :class:`Calibration`) and the shadow optimizer (plain config values: no
import of the selector itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NON_MASKING_SELECTORS = ("KeepAll",)  # selectors that keep every token even when they "enforce"
DEFAULT_SHADOW = "adam"  # CAPOSelector's default optimizer_model
DEFAULT_PERCENTILE = 95.0  # CAPOSelector's default calibration_percentile
SHADOW_NAMES = {"adam": "Adam", "sgd": "SGD"}  # optimizer_model -> its name in labels


@dataclass(frozen=True)
class Calibration:
    """A selector's threshold calibration (``calibration_steps > 0``): its thresholds are measured,
    not configured.

    Attributes:
        steps: ``calibration_steps``, the warm-up steps whose shifts set the thresholds.
        percentile: ``calibration_percentile`` (CAPOSelector's ``DEFAULT_PERCENTILE`` when the
            config omits it).
        lr: ``calibration_lr``, the step size the warm-up measures at; None: the run's own.
    """

    steps: int
    percentile: float = DEFAULT_PERCENTILE
    lr: float | None = None

    def text(self) -> str:
        """``auto p95`` or ``auto p95 @lr 1.5e-05``: what a label says instead of the configured
        thresholds."""
        text = f"auto p{self.percentile:g}"
        return text if self.lr is None else f"{text} @lr {self.lr:g}"


def selector_text(name: str, init: dict, run: Any, monitor: bool) -> str:
    """``Run.selector`` for a selector ``name`` of ``run`` (whose enforces, shadow, calibration are
    set)."""
    shadow = SHADOW_NAMES.get(run.shadow, run.shadow) if run.shadow else None
    # one selector with other thresholds or another shadow is another configuration
    if run.enforces:
        setting = run.calibration.text() if run.calibration else _thresholds(init)
        text = f"{name} {setting}" if setting else name
        return f"{text} ({shadow} shadow)" if run.shadow not in (None, DEFAULT_SHADOW) else text
    if not monitor:
        return name  # KeepAll: keeps every token, no details to tell apart
    details = ["monitor"]
    if run.calibration:
        details.append(run.calibration.text())
    if shadow and (run.advance_when_monitoring or run.shadow != DEFAULT_SHADOW):
        details.append(f"{shadow} shadow")
    return f"{name} ({', '.join(details)})"


def shadow_of(name: str, init: dict) -> str | None:
    """The selector's shadow optimizer model: its ``optimizer_model``, CAPO's default, or None (it
    has none)."""
    if init.get("optimizer_model") is not None:
        return str(init["optimizer_model"]).lower()
    return DEFAULT_SHADOW if name == "CAPO" else None


def calibration_of(init: dict) -> Calibration | None:
    """The selector's ``calibration_*`` settings when ``calibration_steps > 0``, else None (fixed
    thresholds)."""
    try:
        steps = int(init.get("calibration_steps") or 0)
    except (TypeError, ValueError):
        return None
    if steps <= 0:
        return None
    percentile = as_float(init.get("calibration_percentile"))
    percentile = DEFAULT_PERCENTILE if percentile is None else percentile
    return Calibration(steps, percentile, as_float(init.get("calibration_lr")))


def as_float(value: Any) -> float | None:
    """``float(value)``, None for a missing or non-numeric value (a bool is not a number here)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _thresholds(init: dict) -> str:
    """``δF 0.0001 τH 0.01`` from a CAPO-like selector's init_args ("" when it has none)."""
    if "delta_f" not in init or "tau_h" not in init:
        return ""
    return f"δF {float(init['delta_f']):g} τH {float(init['tau_h']):g}"
