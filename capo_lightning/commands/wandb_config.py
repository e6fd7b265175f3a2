"""W&B from a config: the run's name and group from what it trains, and the resolved config
uploaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

WANDB_CLASS = "lightning.pytorch.loggers.WandbLogger"


def run_label(config: Any) -> str:
    """``<objective>-<selector>-<regime>``, e.g. ``GRPO-CAPO-lr1.5e-05x96`` (the W&B group: seeds
    are its runs).

    objective and selector are class names (``none`` without a selector, ``CAPOmonitor`` for a
    measuring selector); the regime is the config's top-level ``regime`` name when it has one, else
    the learning rate and the completions per step, which is what the paper's regimes vary.
    """
    model = config.get("model") or {}
    objective = _class_name(model.get("objective")) or "GRPO"
    selector_entry = model.get("selector")
    selector = (_class_name(selector_entry) or "none").removesuffix("Selector")
    init = _init_args(selector_entry)
    if init.get("enforce") is False:
        selector += "monitor"
    regime = config.get("regime")
    regime = regime.get("name") if hasattr(regime, "get") else regime
    if not regime:
        lr = _init_args(model.get("optimizer")).get("lr")
        data = config.get("data") or {}
        per_step = (data.get("prompts_per_step") or 0) * (data.get("group_size") or 0)
        regime = f"lr{lr:g}x{per_step}" if isinstance(lr, (int, float)) else f"x{per_step}"
    return f"{objective}-{selector}-{regime}"


def run_name(config: Any) -> str:
    """``<objective>-<selector>-<regime>-s<seed>``: one run's name (also its ``{run}`` folder)."""
    return f"{run_label(config)}-s{config.get('seed_everything')}"


def fill_wandb_logger(entry: Any, config: Any) -> None:
    """Give a WandbLogger entry without a name the run's label and seed, group and tags (in
    place)."""
    if getattr(entry, "class_path", None) != WANDB_CLASS:
        return
    init_args = entry.init_args
    label = run_label(config)
    if not init_args.get("name"):
        init_args["name"] = run_name(config)
    if not init_args.get("group"):
        init_args["group"] = label
    if not init_args.get("tags"):
        init_args["tags"] = label.split("-")


def finish_wandb_runs(trainer: Trainer) -> None:
    """Finish the W&B run of every WandbLogger that started one (its last rows are written now)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


class CapoSaveConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in the log folder, and for a W&B run also its ``config``
    (searchable in the W&B UI) and the YAML file among the run's files."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Upload the resolved config to every W&B logger (rank zero)."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(self.config.as_dict())
                text = self.parser.dump(self.config, skip_none=False)
                (Path(logger.experiment.dir) / "capo_config.yaml").write_text(text)


def _class_name(entry: Any) -> str | None:
    class_path = entry.get("class_path") if hasattr(entry, "get") else None
    return class_path.rsplit(".", 1)[-1] if class_path else None


def _init_args(entry: Any) -> dict[str, Any]:
    init = entry.get("init_args") if hasattr(entry, "get") else None
    return dict(init) if init else {}
