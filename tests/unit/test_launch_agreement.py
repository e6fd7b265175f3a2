"""What the processes of one launch agree on (capo_lightning/scale/launch.py), without launching: the run stamp
through a real TCPStore standing in for torchrun's agent store, and the rank variables from Lightning's own cluster
environments. tests/integration/test_launch.py launches for real."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from torch.distributed import TCPStore

from capo_lightning.scale.launch import (
    STAMP_FORMAT,
    STAMP_VARIABLE,
    export_rank_environment,
    run_stamp,
    stamp_scope,
)

HOUR = 3600.0


def _own(seconds: float) -> str:
    return time.strftime(STAMP_FORMAT, time.localtime(seconds))


def test_a_stamp_given_by_the_launcher_wins_and_one_process_reads_its_clock() -> None:
    environ = {STAMP_VARIABLE: "given"}
    assert run_stamp(environ, clock=lambda: 0.0) == "given"
    environ = {}
    assert run_stamp(environ, clock=lambda: HOUR) == _own(HOUR) == environ[STAMP_VARIABLE]  # children inherit it


def test_a_commands_stamp_is_taken_back_when_it_ends_and_a_launchers_is_kept() -> None:
    environ: dict[str, str] = {}
    with stamp_scope(environ):
        first = run_stamp(environ, clock=lambda: 0.0)
        assert environ[STAMP_VARIABLE] == first  # what the command's child processes inherit
    assert STAMP_VARIABLE not in environ
    with stamp_scope(environ):  # the next command in the same process stamps its own run
        assert run_stamp(environ, clock=lambda: HOUR) == _own(HOUR) != first
    launched = {STAMP_VARIABLE: "given"}
    with stamp_scope(launched):
        assert run_stamp(launched, clock=lambda: HOUR) == "given"
    assert launched == {STAMP_VARIABLE: "given"}


def test_slurm_tasks_of_one_step_share_the_job_and_step() -> None:
    task = dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="77", SLURM_STEP_ID="3")
    assert run_stamp(dict(task), clock=lambda: 0.0) == run_stamp(dict(task), clock=lambda: HOUR) == "job77.3"
    # one task (or an salloc shell, no task id) runs alone: its own clock, so two runs in one job differ
    assert run_stamp(task | {"SLURM_NTASKS": "1"}, clock=lambda: HOUR) == _own(HOUR)
    assert run_stamp({"SLURM_JOB_ID": "77"}, clock=lambda: HOUR) == _own(HOUR)


def test_torchrun_ranks_take_rank_zeros_stamp_from_the_agent_store() -> None:
    agent = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))  # what torchrun's agent hosts

    def worker(rank: int) -> dict[str, str]:
        return dict(
            TORCHELASTIC_USE_AGENT_STORE="True", WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(agent.port),
        )  # fmt: skip

    seen: list[str] = []
    waiting = threading.Thread(target=lambda: seen.append(run_stamp(worker(1), clock=lambda: 5 * HOUR)))
    waiting.start()  # rank 1 first: it waits for rank 0's stamp
    assert run_stamp(worker(0), clock=lambda: HOUR) == _own(HOUR)
    waiting.join(timeout=30)
    assert seen == [_own(HOUR)]
    assert run_stamp(worker(0), clock=lambda: 2 * HOUR) == _own(HOUR)  # a restarted rank 0 keeps the run's stamp


def test_the_rank_variables_come_from_the_cluster_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = dict(
        SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NODEID="1",
        SLURM_NODELIST="gpu[07-08]", SLURM_JOB_ID="123456", SLURM_JOB_NAME="capo",
    )  # fmt: skip
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # remembered, so that what Lightning sets is undone too
        monkeypatch.delenv(name)
    environ: dict[str, str] = {}
    exported = export_rank_environment(SimpleNamespace(cluster_environment=SLURMEnvironment()), environ)
    # SLURM's task ids, the node list's first node and the port Lightning derives from the job id
    expected = dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", MASTER_ADDR="gpu07", MASTER_PORT=str(15000 + 3456))
    assert exported == environ == expected
    # one process: nothing to export, the environment stays as it was
    assert export_rank_environment(SimpleNamespace(cluster_environment=LightningEnvironment()), environ) == {}
    assert export_rank_environment(SimpleNamespace(), environ) == {} and environ == expected
    assert export_rank_environment(None, environ) == {}
