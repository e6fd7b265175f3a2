"""docs/reliability.md is what scripts/fault_soak.py writes from the committed soak results, and those results
cover what the page claims: every injection point a run reaches, at least 20 timed kills, SIGTERM and SIGUSR1, the
engine raising, a full disk, damaged checkpoints, and every check (both damaged, sharded, grader, bad data) held."""

from __future__ import annotations

import importlib.util
import json

from capo_lightning.faults import RUN_POINTS
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "scripts/fault_soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def test_the_page_is_generated_from_the_committed_results() -> None:
    results = json.loads(soak.RESULTS.read_text())
    assert soak.PAGE.read_text() == soak.render(results), "rerun: python scripts/fault_soak.py page"


def test_the_soak_covered_every_fault_class_and_each_held() -> None:
    results = json.loads(soak.RESULTS.read_text())
    cases = results["cases"]
    assert {c["point"] for c in cases if c["kind"] == "injected_kill"} == set(RUN_POINTS)
    timed = [c for c in cases if c["kind"] == "timed_kill"]
    assert len(timed) >= 20 and all(c["first_exit"] == soak.KILLED for c in timed)
    assert {c["kind"] for c in cases} == set(soak.KINDS)
    assert {c.get("damage") for c in cases if c["kind"] == "damaged_checkpoint"} == {"truncate", "flip"}
    assert all(c["state_equal"] and c["log_equal"] for c in cases), [c["name"] for c in cases if not c["state_equal"]]
    checks = {c["name"]: c for c in results["checks"]}
    named = {"both_damaged", "sharded", "grader", "vllm_engine_raise"}
    assert named <= checks.keys() and len(checks) == len(named) + len(soak.BAD_ROWS)
    assert all(c["held"] for c in checks.values()), [n for n, c in checks.items() if not c["held"]]
