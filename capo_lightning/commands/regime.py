"""Training regimes as scale-free multipliers on a base config (capo-method.md section 5.2).

A scale's base config (the CPU study's, the paper's) holds the *conservative* point: its learning
rate, prompts per step, steps and validation interval. A regime multiplies them. The paper's
aggressive regime is 5x the learning rate on 1/12 of the batch, run for about twice the steps (100
steps of 96 completions against about 52 steps of 1,152), so the same ``conf/regime/*.yaml`` files
stack on any scale's base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Regime:
    """What a regime changes, relative to the base config it is stacked on.

    Args:
        name: the regime's name (run names, W&B groups and ``capo report`` groups use it).
        lr_scale: multiplies ``model.optimizer.init_args.lr``.
        batch_scale: multiplies ``data.prompts_per_step`` (completions per prompt stay
            ``data.group_size``); the product must be a whole number of prompts.
        steps_scale: multiplies ``trainer.max_steps`` and an integer ``trainer.val_check_interval``,
            so every regime validates as many times.
        warmup_ratio: sets the ``WarmupCosineLR`` warm-up ratio; None leaves the base's.
    """

    name: str = ""
    lr_scale: float = 1.0
    batch_scale: float = 1.0
    steps_scale: float = 1.0
    warmup_ratio: float | None = None


def apply_regime(config: Any) -> None:
    """Apply ``config.regime``'s multipliers to the config in place, then set them to 1.

    The saved config then holds the values the run used with the regime's name, so running it again
    does not apply the regime twice. Raises ValueError naming the field when a product is not a
    whole number.
    """
    regime = config.get("regime")
    if regime is None or not regime.get("name"):
        return
    lr_path = "model.optimizer.init_args.lr"
    if regime.lr_scale != 1.0:
        config[lr_path] = float(config[lr_path]) * regime.lr_scale
    if regime.batch_scale != 1.0:
        config["data.prompts_per_step"] = _whole(
            config["data.prompts_per_step"] * regime.batch_scale,
            "data.prompts_per_step",
            "regime.batch_scale",
        )
    if regime.steps_scale != 1.0:
        config["trainer.max_steps"] = _whole(
            config["trainer.max_steps"] * regime.steps_scale,
            "trainer.max_steps",
            "regime.steps_scale",
        )
        interval = config.get("trainer.val_check_interval")
        if isinstance(interval, int) and not isinstance(interval, bool):
            config["trainer.val_check_interval"] = _whole(
                interval * regime.steps_scale, "trainer.val_check_interval", "regime.steps_scale"
            )
    if regime.warmup_ratio is not None and config.get("model.lr_scheduler.init_args") is not None:
        config["model.lr_scheduler.init_args.warmup_ratio"] = regime.warmup_ratio
    regime.lr_scale = regime.batch_scale = regime.steps_scale = 1.0


def _whole(value: float, field: str, scale: str) -> int:
    rounded = round(value)
    if rounded < 1 or abs(value - rounded) > 1e-6:
        raise ValueError(
            f"{scale} makes {field} = {value:g}, not a whole number >= 1; give the base config a "
            f"{field} that the regime's scale keeps whole (for the aggressive regime's 1/12 batch: "
            "a multiple of 12)"
        )
    return rounded
