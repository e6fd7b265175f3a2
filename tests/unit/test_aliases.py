"""The modules that left the package root keep their old dotted names (``capo_lightning/__init__.py``'s finder):
the old name is the moved module itself, imported only when asked for; every class path the shipped configs,
the sweeps and the committed run configs name resolves; an old committed config still parses."""

from __future__ import annotations

import importlib
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import capo_lightning
from tests.conftest import ROOT

# the old name -> where it lives now, spelled out here independently of the finder's own table
MOVED = {
    "optim": "training.optim",
    "parallel": "scale.parallel",
    "cli": "commands.cli",
    "export": "commands.export",
    "regime": "commands.regime",
    "wandb_config": "commands.wandb_config",
    "policy": "models.policy",
    "lora": "models.lora",
    "lm_head": "models.lm_head",
    "forward": "models.forward",
    "metrics": "evaluation.metrics",
}
CONFIGS = sorted(
    [*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "sweeps").glob("*.yaml"), *(ROOT / "docs/study").rglob("config.yaml")]
)
OLD_CONFIG = ROOT / "docs/study/regimes/conservative_grpo_s0/config.yaml"  # names capo_lightning.optim.WarmupCosineLR


def test_the_finder_maps_exactly_the_old_root_modules_and_no_old_file_is_left() -> None:
    assert capo_lightning.MOVED == {f"capo_lightning.{old}": f"capo_lightning.{new}" for old, new in MOVED.items()}
    root = Path(capo_lightning.__file__).parent
    assert [old for old in MOVED if (root / f"{old}.py").exists()] == []
    assert all((root / f"{new.replace('.', '/')}.py").is_file() for new in MOVED.values())


@pytest.mark.parametrize(("old", "new"), MOVED.items())
def test_an_old_name_is_the_moved_module_itself(old: str, new: str) -> None:
    old_module = importlib.import_module(f"capo_lightning.{old}")
    new_module = importlib.import_module(f"capo_lightning.{new}")
    assert old_module is new_module
    assert sys.modules[f"capo_lightning.{old}"] is new_module
    assert getattr(capo_lightning, old) is new_module  # `import capo_lightning.optim; capo_lightning.optim.X`
    assert new_module.__name__ == new_module.__spec__.name == f"capo_lightning.{new}"  # it keeps its own name


def test_from_an_old_name_import_gives_the_same_objects() -> None:
    # the old names (ruff sorts them apart: no file has these paths any more)
    from capo_lightning.cli import main as old_main
    from capo_lightning.optim import WarmupCosineLR as OldWarmupCosineLR
    from capo_lightning.parallel import FSDP2Strategy as OldFSDP2Strategy
    from capo_lightning.policy import PolicySpec as OldPolicySpec

    from capo_lightning.commands.cli import main
    from capo_lightning.models.policy import PolicySpec
    from capo_lightning.scale.parallel import FSDP2Strategy
    from capo_lightning.training.optim import WarmupCosineLR

    assert OldWarmupCosineLR is WarmupCosineLR and OldFSDP2Strategy is FSDP2Strategy
    assert OldPolicySpec is PolicySpec and old_main is main


def test_an_old_checkpoints_pickled_class_loads_as_the_moved_class() -> None:
    from capo_lightning.models.policy import PolicySpec

    assert pickle.loads(b"ccapo_lightning.policy\nPolicySpec\n.") is PolicySpec  # noqa: S301 (our own bytes)


def test_the_package_imports_nothing_heavy_and_names_no_module_that_was_not_moved() -> None:
    code = (
        "import sys, importlib.util, capo_lightning\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'transformers',"
        " 'jsonargparse') or (m.startswith('capo_lightning.')))\n"
        "print(heavy, importlib.util.find_spec('capo_lightning.no_such_module'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[] None"


def test_python_m_an_old_name_runs_the_moved_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "capo_lightning.cli", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "capo fit|validate|test" in proc.stdout


# ---- class paths in configs ----------------------------------------------------------------------


def named_objects(path: Path) -> set[str]:
    """Every ``class_path`` value of a YAML file and every dotted ``capo_lightning`` name in its other values
    (bare strings such as callback list entries and ``reward_fn``, flags in a sweep's command); not comments."""
    found = set()

    def walk(node: object, key: object = None) -> None:
        if isinstance(node, dict):
            for child_key, value in node.items():
                walk(value, child_key)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            found.update(re.findall(r"\bcapo_lightning(?:\.\w+)+", node))
            if key == "class_path":
                found.add(node)

    walk(yaml.safe_load(path.read_text()))
    return found


def resolve(dotted: str) -> object:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[end:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_configs_are_found_and_name_old_and_new_paths() -> None:
    names = set().union(*(named_objects(path) for path in CONFIGS))
    assert len(CONFIGS) > 50 and len(names) > 25
    assert {"capo_lightning.optim.WarmupCosineLR", "capo_lightning.training.optim.WarmupCosineLR"} <= names
    assert {"capo_lightning.scale.parallel.FSDP2Strategy", "capo_lightning.rewards.math.math_reward"} <= names
    assert resolve("capo_lightning.optim.WarmupCosineLR") is resolve("capo_lightning.training.optim.WarmupCosineLR")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_object_resolves(path: Path) -> None:
    unresolved = []
    for name in sorted(named_objects(path)):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{name}: {error!r}")
    assert unresolved == []


def test_the_shipped_configs_name_only_new_paths_and_the_committed_runs_keep_theirs() -> None:
    """conf/ and sweeps/ moved to the new paths; the committed run configs keep the ones they ran with."""

    def old_names(paths: list[Path]) -> list[str]:
        old = tuple(f"capo_lightning.{name}." for name in MOVED)
        return sorted(f"{p.relative_to(ROOT)}: {n}" for p in paths for n in named_objects(p) if n.startswith(old))

    shipped = [p for p in CONFIGS if p.relative_to(ROOT).parts[0] in ("conf", "sweeps")]
    committed = [p for p in CONFIGS if p.relative_to(ROOT).parts[0] == "docs"]
    assert shipped and committed
    assert old_names(shipped) == []
    assert old_names(committed) != []


def test_an_old_committed_config_parses(capsys: pytest.CaptureFixture[str]) -> None:
    from capo_lightning.commands.cli import main
    from capo_lightning.scale.parallel import FSDP2Strategy
    from capo_lightning.training.optim import WarmupCosineLR

    assert "capo_lightning.optim.WarmupCosineLR" in OLD_CONFIG.read_text()
    old_strategy = '--trainer.strategy={"class_path": "capo_lightning.parallel.FSDP2Strategy"}'  # as old configs did
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(OLD_CONFIG), old_strategy, "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    # jsonargparse found the classes (their init_args filled in); the printed paths name them, old or new
    assert resolve(printed["model"]["lr_scheduler"]["class_path"]) is WarmupCosineLR
    assert resolve(printed["trainer"]["strategy"]["class_path"]) is FSDP2Strategy
    assert printed["trainer"]["strategy"]["init_args"]["param_dtype"] == "bfloat16"
