"""One source of truth for metric keys (capo_lightning/keys.py), and every key a reader names written by a real run.

1. No library file spells a metric key out (a string constant or f-string starting ``train/``, ``select/`` ...,
   docstrings aside): producers and readers all go through ``capo_lightning.keys``.
2. Every string key of ``capo_lightning.keys`` that the library or the study scripts name (callbacks, the collapse
   detector, ``capo report``, the study tables, and the producers themselves) is a column of the ``metrics.csv`` of
   real ``capo fit`` runs of the tiny model covering the step's paths (CAPO with every callback and validation, a
   KL objective over two PPO epochs, DAPO with dynamic sampling), except the few named in ``NOT_IN_A_CPU_FIT``.
3. A selector written only here, with its own test, shift and setting names, is monitored by ``RejectionMonitor``
   and ``CurvatureMonitor``, which log its names and none of CAPO's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from capo_lightning import keys
from capo_lightning.callbacks import CurvatureMonitor, RejectionMonitor
from capo_lightning.commands.cli import main
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.selection import Selection, Selector, TokenView
from tests.helpers import SGD, FixedBatches, make_trainer, read_csv_metrics, tiny_rollout

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "capo_lightning"
KEY = re.compile(r"^(train|rollout|objective|select|curvature|collapse|val|test|time|verifier|eval)/")
NOT_IN_A_CPU_FIT = {
    "SYNC_PROBE_GAP": "the vLLM engine's weight-sync probe (tests/vllm check it)",
    "VALID_PROMPTS": "an eval batch's bookkeeping in RolloutBatch.stats, never logged",
    "VERIFIER": "a prefix, not a key",
}
TINY = ["fit", "--config", "conf/debug/tiny_cpu.yaml", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"]
VARIED = [
    "--data.reward_fn.class_path", "capo_lightning.rewards.shaping.OverlongPenalty",
    "--data.reward_fn.init_args.reward_fn", "capo_lightning.rewards.math.math_reward",
    "--data.reward_fn.init_args.cache_fraction", "1.0",
]  # fmt: skip
CALLBACKS = [f"--trainer.callbacks+=capo_lightning.callbacks.{name}" for name in ("CollapseDetector",)]


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelled_out_keys(root: Path) -> list[str]:
    """``file:line: text`` of every string constant or f-string part outside docstrings that starts like a key."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "keys.py" and path.parent == root:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)  # and the parts of f-strings, judged with their f-string
        docs |= {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if KEY.match(node.value):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                if KEY.match(str(node.values[0].value)):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: f{node.values[0].value!r}...")
    return found


def named_keys(paths: list[Path]) -> dict[str, set[str]]:
    """``keys.NAME`` -> the files naming it, for every string constant of capo_lightning.keys."""
    constants = {name for name, value in vars(keys).items() if name.isupper() and isinstance(value, str)}
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "keys":
                if node.attr in constants:
                    found.setdefault(node.attr, set()).add(str(path.relative_to(ROOT)))
    return found


def test_no_library_file_spells_a_metric_key_out() -> None:
    assert spelled_out_keys(PACKAGE) == []


def test_the_checker_finds_a_spelled_out_key(tmp_path: Path) -> None:
    """The scan itself: a literal key and an f-string key are found, a docstring mentioning one is not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text('"""Logs ``train/reward_mean``."""\nX = "train/reward_mean"\nY = f"select/{1}"\n')
    assert [line.split(": ", 1)[1] for line in spelled_out_keys(package)] == ["'train/reward_mean'", "f'select/'..."]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The columns of three real tiny runs that between them take every path that logs."""
    runs = {
        "capo": [*TINY, *VARIED, *CALLBACKS, "--config", "conf/selector/capo.yaml", "--data.prompts_per_step", "4",
                 "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
                 "--model.micro_batch_size", "5"],
        "kl_multi_pass": [*TINY, *VARIED, "--model.objective.init_args.beta", "0.1", "--model.ppo_epochs", "2"],
        "dapo": [*TINY, "--config", "conf/objective/dapo.yaml", "--data.reward_fn.init_args.cache_fraction", "1.0",
                 "--data.prompts_per_step", "4"],
    }  # fmt: skip
    columns: set[str] = set()
    for name, args in runs.items():
        root = tmp_path_factory.mktemp(name)
        main([*args, f"--trainer.default_root_dir={root}"])
        for row in read_csv_metrics(root):
            columns |= set(row)
    return columns


def unwritten(named: dict[str, set[str]], written: set[str]) -> dict[str, list[str]]:
    """The named constants whose key no run wrote (the documented exceptions aside), with who names them."""
    return {
        name: sorted(files)
        for name, files in named.items()
        if getattr(keys, name) not in written and name not in NOT_IN_A_CPU_FIT
    }


def test_every_key_the_package_and_the_study_scripts_name_is_written(written: set[str]) -> None:
    named = named_keys([*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")])
    assert {"REWARD_MEAN", "TOKEN_REJECT_RATE", "ACCURACY", "VAL_ACCURACY", "TOKEN_FISHER_P95"} <= set(named)
    assert unwritten(named, written) == {}, "keys named but written by no run"


def test_the_check_fails_on_a_key_no_run_writes(written: set[str], tmp_path: Path) -> None:
    """A reader naming a key of keys.py that no run writes (a KL metric read by a run without KL is not it: the
    KL run writes it; the DAPO sampling key read as GRPO's would be) is reported with the file naming it."""
    reader = ROOT / "tests" / "_unwritten_reader_probe.py"
    try:
        reader.write_text("from capo_lightning import keys\nVALUE = keys.GROUPS_FILLED\n")
        named = named_keys([reader])
        without_dapo = written - {keys.GROUPS_FILLED}
        assert unwritten(named, without_dapo) == {"GROUPS_FILLED": ["tests/_unwritten_reader_probe.py"]}
        assert unwritten(named, written) == {}
    finally:
        reader.unlink()


# ---- a selector the callbacks have never heard of -------------------------------------------------------------------
class ParitySelector(Selector):
    """Rejects the tokens at odd positions ("parity" test); reports a per-token "token_position" shift, a step-level
    "odd_share" shift and a "period" setting."""

    def forward(self, view: TokenView) -> Selection:
        position = torch.arange(view.response_mask.shape[1]).expand_as(view.response_mask)
        odd = (position % 2 == 1) & view.response_mask
        shifts = {"token_position": position.float(), "odd_share": odd.float().sum() / view.response_mask.sum()}
        return Selection(
            ~odd, judged=view.response_mask, failed={"parity": odd}, shifts=shifts, settings={"period": 2.0}
        )


def test_a_selector_defined_in_a_test_is_monitored_under_its_own_names(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    batch = tiny_rollout(tiny_model_dir, num_prompts=2)
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), selector=ParitySelector(), optimizer=SGD(0.01))
    monitors = [RejectionMonitor(prog_bar=False), CurvatureMonitor(0)]
    trainer = make_trainer(2, monitors, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=FixedBatches([batch] * 2))
    row = next(r for r in read_csv_metrics(tmp_path) if keys.TOKEN_REJECT_RATE in r)
    mask = batch.response_mask
    odd = (torch.arange(mask.shape[1]).expand_as(mask) % 2 == 1) & mask
    assert row[keys.TOKEN_REJECT_RATE] == pytest.approx(float(odd.sum() / mask.sum()))
    assert row[keys.reject_rate("parity")] == row[keys.TOKEN_REJECT_RATE]
    assert row[keys.threshold("period")] == 2.0
    assert row[keys.shift("token_position", "max")] == float(mask.sum(1).max() - 1)
    assert row[keys.shift("token_position", "max", masked=True)] % 2 == 0  # only even positions kept
    assert row[keys.shift("odd_share")] == pytest.approx(float(odd.sum() / mask.sum()))
    assert not any("fisher" in key or "hessian" in key for key in row), sorted(row)
