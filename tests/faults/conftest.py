from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from capo_lightning.faults import TRACE_VARIABLE
from tests.faults.harness import STEPS, output, run, soak


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run every fault case must end as: its final state, joined log rows, and how often it
    reached each injection point (traced)."""
    root = tmp_path_factory.mktemp("reference") / "run"
    trace = root.parent / "trace.txt"
    assert run(root, tiny_model_dir, {TRACE_VARIABLE: str(trace)}) == 0, output(root)[-3000:]
    rows = soak.log_rows(root)
    assert {row["step"] for row in rows} == set(map(float, range(1, STEPS + 1)))  # the comparison has substance
    return {"state": soak.final_state(root), "rows": rows, "arrivals": Counter(trace.read_text().split())}
