"""The ``capo`` command: LightningCLI over CAPOModule and RolloutDataModule."""

from __future__ import annotations

import difflib
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.module import CAPOModule
from capo_lightning.regime import Regime, apply_regime
from capo_lightning.wandb_config import CapoSaveConfig, fill_wandb_logger, finish_wandb_runs, run_name

DESCRIPTION = (
    "capo fit|validate|test --config A.yaml [--config B.yaml] [--key=value ...]: train or grade a policy. "
    "Also: capo report RUN_DIR... --out DIR (figures of logged runs), capo export --ckpt_path PATH --out DIR "
    "(the trained policy as a Hugging Face folder); each takes --help."
)
_DIR_ARGS = {"dirpath": "checkpoints", "save_dir": ""}  # init arg -> sub-folder of trainer.default_root_dir


class CapoArgumentParser(LightningArgumentParser):
    """Adds "did you mean ...?" to errors about unknown keys (a typo in a YAML or a flag)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Append close matches of the offending key, then report as jsonargparse does."""
        parser = getattr(ex, "subcommand_parser", None) or self
        hint = _suggest(message, parser)
        super().error(message + hint if hint else message, ex)


def _suggest(message: str, parser: LightningArgumentParser) -> str:
    match = re.search(r"(?:option|arguments:)\s*'?-*([\w.]+)", message)
    if match is None:
        return ""
    keys = [
        o.lstrip("-")
        for a in parser._actions
        for o in a.option_strings
        if o.startswith("--") and not o.endswith(".help")
    ]
    close = difflib.get_close_matches(match.group(1), keys, n=3, cutoff=0.75)
    return f". Did you mean: {', '.join('--' + k for k in close)}?" if close else ""


class CapoCLI(LightningCLI):
    """``capo fit|validate|test --config A.yaml --config B.yaml --model.lr_scheduler.init_args.warmup_ratio=0``.

    Later ``--config`` files override earlier ones, dotted flags override both, and ``${...}``
    interpolation works inside a config file (``parser_mode="omegaconf"``).

    Checkpoint callbacks and loggers given without a directory are placed under
    ``trainer.default_root_dir`` (checkpoints in ``<root>/checkpoints``, logs in ``<root>``), so
    one flag moves a whole run and ``--ckpt_path last`` finds the previous run's last checkpoint.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``; ``predict`` is left out, since the module has no predict step
        (``capo export`` writes the trained model for other tools, ``capo test`` grades it)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``regime``: scale-free multipliers on the base config (``conf/regime/*.yaml``, :mod:`.regime`)."""
        parser.add_class_arguments(Regime, "regime")

    def before_instantiate_classes(self) -> None:
        """Apply the regime; fill ``{run}`` (the run's name) and ``{stamp}`` (its start time) in
        default_root_dir; give callbacks and loggers without a folder one under it."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        apply_regime(config)
        seed = config.get("seed_everything")
        if config.get("data.seed") is None and isinstance(seed, int) and not isinstance(seed, bool):
            config["data.seed"] = seed  # replicates differ in prompts and samples, not only in name
        trainer = config["trainer"]
        root_dir = str(trainer.get("default_root_dir") or "")
        if "{run}" in root_dir or "{stamp}" in root_dir:  # one folder per run (sweeps, studies)
            stamp = os.environ.setdefault("CAPO_RUN_STAMP", time.strftime("%Y%m%d-%H%M%S"))  # DDP ranks inherit it
            trainer["default_root_dir"] = root_dir.replace("{run}", run_name(config)).replace("{stamp}", stamp)
        root = Path(trainer.get("default_root_dir") or ".")
        entries: list[Any] = list(trainer.get("callbacks") or [])
        logger = trainer.get("logger")
        entries += logger if isinstance(logger, list) else [logger]
        for entry in entries:
            fill_wandb_logger(entry, config)
            init_args = getattr(entry, "init_args", None)
            if init_args is None:
                continue
            for arg, sub in _DIR_ARGS.items():
                if arg in init_args and init_args[arg] in (None, "", "."):
                    init_args[arg] = str(root / sub) if sub else str(root)

    def after_fit(self) -> None:
        """Close W&B runs now (flushing their last steps), not at interpreter exit."""
        finish_wandb_runs(self.trainer)

    after_validate = after_test = after_fit


def _quiet_known_warnings() -> None:
    """Silence warnings that are expected here and only hide the real ones."""
    # RolloutBatch moves itself; Lightning notes the override on every run
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    # checkpoints are written after the optimizer step on purpose: global_step and weights agree
    warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
    # a Lightning 2.6 / torch 2.13 deprecation inside Lightning itself
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def main(args: ArgsType = None) -> None:
    """Entry point of the ``capo`` console script (``fit``, ``validate``, ``test``, ``report``, ``export``);
    tests call ``main([...])``.

    ``capo report ...`` goes to :func:`capo_lightning.report.main` and ``capo export ...`` to
    :func:`capo_lightning.export.main` (plain argparse, no LightningCLI).
    """
    import sys

    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
        from capo_lightning.report import main as report_main

        report_main(list(argv[1:]))
        return
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["export"]:
        from capo_lightning.export import main as export_main

        export_main(list(argv[1:]))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_known_warnings()
    build_cli(args)


def build_cli(args: ArgsType = None, run: bool = True) -> CapoCLI:
    """The ``capo`` command's LightningCLI; ``run=False`` parses and instantiates without running a subcommand."""
    return CapoCLI(
        CAPOModule,
        RolloutDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_class=CapoArgumentParser,
        save_config_callback=CapoSaveConfig,
        parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
    )


if __name__ == "__main__":
    main()
