"""The ``capo`` command: LightningCLI over CAPOModule and RolloutDataModule."""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from capo_lightning.callbacks.durable_log import DurableLog
from capo_lightning.callbacks.verified_checkpoint import refuse_unverified
from capo_lightning.commands import preemption
from capo_lightning.commands.regime import Regime, apply_regime
from capo_lightning.commands.wandb_config import (
    CapoSaveConfig,
    fill_wandb_logger,
    finish_wandb_runs,
    run_name,
)
from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.module import CAPOModule
from capo_lightning.scale.launch import run_stamp, stamp_scope

DESCRIPTION = (
    "capo fit|validate|test --config A.yaml [--config B.yaml] [--key=value ...]: train or grade a "
    "policy. Also: capo report RUN_DIR... --out DIR (figures of logged runs), capo export "
    "--ckpt_path PATH --out DIR (the trained policy as a Hugging Face folder); each takes --help."
)
# init arg -> sub-folder of trainer.default_root_dir
_DIR_ARGS = {"dirpath": "checkpoints", "save_dir": ""}
_PRINT_CONFIG = "--print_config"
# jsonargparse's --print_config flags -> dump keywords (skip_null: its deprecated skip_unset)
_PRINT_FLAGS = dict(skip_default="skip_default", skip_unset="skip_unset", skip_null="skip_unset")
# jsonargparse offers "comments" only with ruamel.yaml
if find_spec("ruamel") and find_spec("ruamel.yaml"):
    _PRINT_FLAGS["comments"] = "with_comments"


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
    """``capo fit|validate|test --config A.yaml --config B.yaml
    --model.lr_scheduler.init_args.warmup_ratio=0``.

    Later ``--config`` files override earlier ones, dotted flags override both, and ``${...}``
    interpolation works inside a config file (``parser_mode="omegaconf"``).

    Checkpoint callbacks and loggers given without a directory are placed under
    ``trainer.default_root_dir`` (checkpoints in ``<root>/checkpoints``, logs in ``<root>``), so
    one flag moves a whole run and ``--ckpt_path last`` finds the previous run's last checkpoint.

    ``--print_config`` prints the effective config, the one the run uses and saves as
    ``config.yaml`` (see :func:`resolve_config`), and exits without building the model.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (the module has no predict step)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path``'s file here: refuse it first if it does not verify."""
        if subcommand := self.config.get("subcommand"):
            refuse_unverified(self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``regime``: scale-free multipliers on the base config
        (``conf/regime/*.yaml``, :mod:`.regime`)."""
        parser.add_class_arguments(Regime, "regime")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse the command line into ``self.config``; with ``--print_config[=flags]``, print the
        effective config and exit.

        jsonargparse prints the config as parsed, before :meth:`before_instantiate_classes` applies
        the regime and the run's defaults, so its print would show other values than the run uses.
        Here the command line is parsed without ``--print_config``, :func:`resolve_config` (the same
        function the run calls) edits the config, and the parser's own dump prints it as
        jsonargparse would (same flags, same YAML; the whole config when ``--print_config`` comes
        before the subcommand). A flag jsonargparse does not accept is left to jsonargparse, which
        reports it.
        """
        argv = sys.argv[1:] if args is None else args
        request = _print_request(argv) if isinstance(argv, (list, tuple)) else None
        if request is None:
            super().parse_arguments(parser, args)
            return
        position, dump_kwargs, rest = request
        # Lightning warns about args given beside sys.argv: these are sys.argv's own
        if args is None:
            self.config = parser.parse_args(rest)
        else:
            super().parse_arguments(parser, rest)
        # None when built with run=False (no subcommands)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        resolve_config(config, started=False)
        before_subcommand = subcommand is None or position < _subcommand_position(argv, subcommand)
        printer, printed = (
            (parser, self.config) if before_subcommand else (self._parser(subcommand), config)
        )
        sys.stdout.write(printer.dump(printed, **dump_kwargs))
        sys.stdout.flush()
        parser.exit()

    def before_instantiate_classes(self) -> None:
        """Resolve the parsed config into the run's: :func:`resolve_config` with the run started."""
        resolve_config(
            self.config[self.subcommand] if self.subcommand else self.config, started=True
        )

    def after_fit(self) -> None:
        """Close W&B runs now (flushing their last steps), not at interpreter exit."""
        finish_wandb_runs(self.trainer)

    after_validate = after_test = after_fit


def resolve_config(config: Any, started: bool = True) -> None:
    """Turn a parsed (sub)command config into the run's, in place: what ``--print_config`` prints
    (``started=False``) and what the run uses and saves (``started=True``, before the classes are
    built).

    1. The regime's multipliers are applied and then set to 1 (:func:`.regime.apply_regime`), so a
       printed or saved config given back with ``--config`` does not apply them twice.
    2. ``data.seed`` left unset follows an integer ``seed_everything`` (replicates differ in prompts
       and samples, not only in name).
    3. ``{run}`` (the run's name) and ``{stamp}`` (its start time, the same on every rank of a
       launch: :func:`.scale.launch.run_stamp`) are filled in ``trainer.default_root_dir``, W&B
       loggers get the run's name, group and tags, and callbacks and loggers without a folder get
       one under the root (checkpoints in ``<root>/checkpoints``, logs in ``<root>``).

    Only what the run cannot know before it starts stays as written when ``started`` is False:
    ``{stamp}`` (and the callback and logger folders under a root that holds it), and, when
    ``seed_everything`` is true or null (a seed drawn at the start), everything in step 3, since the
    run's name holds the seed. What is filled is written out, as in the saved ``config.yaml``: a
    printed config given back with another ``default_root_dir``, seed or regime name keeps the
    folders and W&B names it printed.
    """
    apply_regime(config)
    seed = config.get("seed_everything")
    if config.get("data.seed") is None and isinstance(seed, int) and not isinstance(seed, bool):
        config["data.seed"] = seed
    # Lightning draws the seed when the run starts
    if not started and (seed is None or seed is True):
        return
    trainer = config["trainer"]
    root_dir = str(trainer.get("default_root_dir") or "")
    if "{run}" in root_dir or "{stamp}" in root_dir:  # one folder per run (sweeps, studies)
        root_dir = root_dir.replace("{run}", run_name(config))
        if started:  # the same on every rank of the launch (torchrun, SLURM, Lightning's own)
            root_dir = root_dir.replace("{stamp}", run_stamp())
        trainer["default_root_dir"] = root_dir
    root = Path(trainer.get("default_root_dir") or ".")
    entries: list[Any] = list(trainer.get("callbacks") or [])
    logger = trainer.get("logger")
    entries += logger if isinstance(logger, list) else [logger]
    for entry in entries:
        fill_wandb_logger(entry, config)
        init_args = getattr(entry, "init_args", None)
        # not started: the folders follow the stamp at the start
        if init_args is None or "{stamp}" in str(root):
            continue
        for arg, sub in _DIR_ARGS.items():
            if arg in init_args and init_args[arg] in (None, "", "."):
                init_args[arg] = str(root / sub) if sub else str(root)


def _print_request(
    argv: list[str] | tuple[str, ...],
) -> tuple[int, dict[str, bool], list[str]] | None:
    """For a command line with ``--print_config[=flags]``: the position of the last one (the one
    jsonargparse honours), the ``dump`` keywords its flags ask for, and the command line without it.
    None without one, or when a flag is not one jsonargparse accepts (jsonargparse then reports
    it)."""
    argv = [str(token) for token in argv]
    hits = [
        i
        for i, token in enumerate(argv)
        if token == _PRINT_CONFIG or token.startswith(_PRINT_CONFIG + "=")
    ]
    if not hits:
        return None
    flags = [flag for flag in argv[hits[-1]].partition("=")[2].split(",") if flag]
    if any(flag not in _PRINT_FLAGS for flag in flags):
        return None
    # jsonargparse's defaults
    dump_kwargs = {"skip_unset": False} | {_PRINT_FLAGS[flag]: True for flag in flags}
    return hits[-1], dump_kwargs, [token for i, token in enumerate(argv) if i not in hits]


def _subcommand_position(argv: list[str] | tuple[str, ...], subcommand: str) -> int:
    """Where ``subcommand`` starts on the command line (before it: the top-level ``--config``,
    ``--print_config``)."""
    for i, token in enumerate(argv):
        if token == subcommand and (i == 0 or argv[i - 1] not in ("-c", "--config")):
            return i
    return len(argv)  # the subcommand came from a top-level config file: every flag is top-level


def _quiet_known_warnings() -> None:
    """Silence warnings that are expected here and only hide the real ones."""
    # RolloutBatch moves itself; Lightning notes the override on every run
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    # checkpoints are written after the optimizer step on purpose: global_step and weights agree
    warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
    # a Lightning 2.6 / torch 2.13 deprecation inside Lightning itself
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def main(args: ArgsType = None) -> None:
    """Entry point of the ``capo`` console script (``fit``, ``validate``, ``test``, ``report``,
    ``export``); tests call ``main([...])``.

    ``capo report ...`` goes to :func:`capo_lightning.report.main` and ``capo export ...`` to
    :func:`capo_lightning.commands.export.main` (plain argparse, no LightningCLI).
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
        from capo_lightning.report import main as report_main

        report_main(list(argv[1:]))
        return
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["export"]:
        from capo_lightning.commands.export import main as export_main

        export_main(list(argv[1:]))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_known_warnings()
    preemption.install()  # SIGUSR1: stop after the step, requeue (SLURM)
    try:
        with stamp_scope():  # the processes this command starts inherit its stamp; the next not
            build_cli(args)
    except SIGTERMException:
        # the step under way finished and was logged, InterruptCheckpoint (if configured) saved
        preemption.exit_preempted()


def build_cli(args: ArgsType = None, run: bool = True) -> CapoCLI:
    """The ``capo`` command's LightningCLI; ``run=False`` parses and instantiates without running a
    subcommand."""
    return CapoCLI(
        CAPOModule,
        RolloutDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_class=CapoArgumentParser,
        save_config_callback=CapoSaveConfig,
        parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
        trainer_defaults={"callbacks": [DurableLog()]},  # every run: the log survives a kill
    )


if __name__ == "__main__":
    main()
