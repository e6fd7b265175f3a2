"""The injection points themselves: inert by default, exact about when and on which rank they act."""

from __future__ import annotations

import errno

import pytest

from capo_lightning import faults


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_reached", {})
    for variable in (faults.VARIABLE, faults.RANK_VARIABLE, faults.TRACE_VARIABLE, "RANK"):
        monkeypatch.delenv(variable, raising=False)


def test_a_point_does_nothing_unless_named_and_acts_on_its_nth_arrival_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for point in faults.POINTS:
        faults.inject(point)  # nothing named: inert
    monkeypatch.setenv(faults.VARIABLE, "backward:3:raise")
    faults.inject("forward")  # another point: not counted
    faults.inject("backward")
    faults.inject("backward")
    with pytest.raises(faults.InjectedFault, match="backward:3:raise"):
        faults.inject("backward")
    faults.inject("backward")  # the 4th arrival: done


def test_enospc_names_the_path_and_the_rank_filter_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.VARIABLE, "checkpoint_write:1:enospc")
    monkeypatch.setenv(faults.RANK_VARIABLE, "1")
    monkeypatch.setenv("RANK", "0")
    faults.inject("checkpoint_write", "/ckpt/last.ckpt")  # rank 0: spared
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(OSError) as error:
        faults.inject("checkpoint_write", "/ckpt/last.ckpt")
    assert error.value.errno == errno.ENOSPC and error.value.filename == "/ckpt/last.ckpt"


def test_the_trace_lists_every_arrival(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(faults.TRACE_VARIABLE, str(trace))
    for point in ("generation", "forward", "forward"):
        faults.inject(point)
    assert trace.read_text().split() == ["generation", "forward", "forward"]


@pytest.mark.parametrize("spec", ["backward", "backward:0", "backward:x", "nowhere:1", "backward:1:explode"])
def test_a_malformed_spec_is_refused_with_the_expected_form(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(faults.VARIABLE, spec)
    with pytest.raises(ValueError, match="CAPO_FAULT=.*expected '<point>:<n>\\[:<action>\\]'"):
        faults.inject("backward")
