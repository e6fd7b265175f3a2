"""What the fault tests share: the fault soak's harness (``scripts/fault_soak.py``) on the tiny model, ``STEPS``
steps with a checkpoint after every step, and the comparison with the uninterrupted reference run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "scripts/fault_soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

STEPS = 4
SEED = 20261207


def run(
    root: Path, model: Path, env: dict[str, str] | None = None, resume: bool | str = False, interrupt: bool = False,
    steps: int = STEPS,
) -> int:  # fmt: skip
    """One ``capo fit`` into ``root`` to its end: its exit status. ``resume``: True = ``--ckpt_path last``, a
    string = that path."""
    extra = (soak.INTERRUPT,) if interrupt else ()
    if isinstance(resume, str):
        extra, resume = (*extra, "--ckpt_path", resume), False
    return soak.run_to_end(soak.fit(root, str(model), steps, env, resume=resume, extra=extra))


def output(root: Path) -> str:
    """Everything the runs into ``root`` printed."""
    return (root.parent / f"{root.name}.log").read_text()


def assert_same_as_reference(root: Path, reference: dict, what: str) -> None:
    assert soak.differences(soak.final_state(root), reference["state"], "state") == [], what
    assert soak.differences(soak.log_rows(root), reference["rows"], "rows") == [], what
