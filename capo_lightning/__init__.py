"""capo_lightning: curvature-aware policy optimization for LLM reasoning, on PyTorch Lightning.

Modules that once sat at the package root keep their old dotted names: ``capo_lightning.optim`` is
:mod:`capo_lightning.training.optim`, the same module object, imported only when the old name is
(old configs' ``class_path`` entries, old checkpoints' pickled classes and
``python -m capo_lightning.cli`` keep working). The package itself imports nothing heavy: the finder
below holds only names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import CodeType, ModuleType

__version__ = "0.1.0"

MOVED = {
    "capo_lightning.cli": "capo_lightning.commands.cli",
    "capo_lightning.export": "capo_lightning.commands.export",
    "capo_lightning.regime": "capo_lightning.commands.regime",
    "capo_lightning.wandb_config": "capo_lightning.commands.wandb_config",
    "capo_lightning.metrics": "capo_lightning.evaluation.metrics",
    "capo_lightning.policy": "capo_lightning.models.policy",
    "capo_lightning.lora": "capo_lightning.models.lora",
    "capo_lightning.lm_head": "capo_lightning.models.lm_head",
    "capo_lightning.forward": "capo_lightning.models.forward",
    "capo_lightning.parallel": "capo_lightning.scale.parallel",
    "capo_lightning.optim": "capo_lightning.training.optim",
}
"""Old dotted name -> the module it now is."""


class _MovedModuleLoader(importlib.abc.Loader):
    """Loads an old name as the module it moved to: ``create_module`` returns that module itself."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        # the import system sets __spec__ to the alias's; put it back
        self._target_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._target_spec  # the module already ran under its own name

    def get_code(self, fullname: str) -> CodeType | None:
        """``python -m <old name>`` (runpy) runs the moved module's code."""
        return importlib.util.find_spec(self.target).loader.get_code(self.target)


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers only for the names in :data:`MOVED`; every other import goes on to the next
    finder."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        moved_to = MOVED.get(fullname)
        if moved_to is None:
            return None
        # its file is the alias's origin (runpy's sys.argv[0])
        real = importlib.util.find_spec(moved_to)
        return importlib.util.spec_from_loader(
            fullname, _MovedModuleLoader(moved_to), origin=real.origin
        )


if not any(
    type(finder).__qualname__ == _MovedModuleFinder.__qualname__ for finder in sys.meta_path
):
    # first: an old name must never find a stray old file
    sys.meta_path.insert(0, _MovedModuleFinder())
