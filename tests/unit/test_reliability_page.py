"""docs/reliability.md is what scripts/fault_soak.py writes from the committed soak results, and those results
cover what the page claims: every injection point, at least 20 timed kills, SIGTERM."""

from __future__ import annotations

import importlib.util
import json

from capo_lightning.faults import POINTS
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "scripts/fault_soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def test_the_page_is_generated_from_the_committed_results() -> None:
    results = json.loads(soak.RESULTS.read_text())
    assert soak.PAGE.read_text() == soak.render(results), "rerun: python scripts/fault_soak.py page"


def test_the_soak_covered_every_point_twenty_timed_kills_and_sigterm() -> None:
    cases = json.loads(soak.RESULTS.read_text())["cases"]
    assert {c["point"] for c in cases if c["kind"] == "injected_kill"} == set(POINTS)
    timed = [c for c in cases if c["kind"] == "timed_kill"]
    assert len(timed) >= 20 and all(c["first_exit"] == soak.KILLED for c in timed)
    assert any(c["kind"] == "sigterm" for c in cases)
