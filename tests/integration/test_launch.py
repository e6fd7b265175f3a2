"""Launches that run: the real ``capo fit`` started as docs/scaling.md starts it, 2 CPU processes over gloo.

- torchrun across two "nodes": two concurrent ``torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 1`` agents
  (static rendezvous at 127.0.0.1), with ``conf/trainer/fsdp.yaml`` and with ``conf/trainer/ddp.yaml``;
- a SLURM step: two processes given the variables ``srun`` sets for 2 nodes x 1 task. No ``srun`` runs and none is
  needed: Lightning's ``SLURMEnvironment`` reads the variables only (it warns when an ``srun`` on PATH goes unused);
- one node, Lightning's own launcher: ``capo fit`` alone with 2 devices, rank 1 started by Lightning.

Each launch trains 2 steps into ``runs/{run}-{stamp}``, then the same launch resumes from ``--ckpt_path last`` for a
third. Asserted for each:

- one run folder, and every rank named it with the same stamp, though the two processes run on clocks an hour apart
  (``TZ``, a certain stand-in for ranks that resolve their config in different seconds; Lightning's own launcher
  hands its environment down, clock included). Before
  ``capo_lightning.scale.launch.run_stamp`` each rank stamped with its own clock and rank 1 named a folder an hour
  later; only Lightning's broadcast of rank 0's checkpoint folder (and loggers writing on rank 0) kept the files of
  these runs in one, while whatever a rank writes under its own root went astray (on a crash under FSDP2,
  ``InterruptCheckpoint`` wrote rank 1's shard into rank 1's folder);
- the update of one process given the same global batch, to a relative 1e-5: the engine is
  :class:`tests.helpers.ScriptedEngine`, whose completions depend on the prompt only, and the optimizer SGD with
  momentum, linear in the gradient (Adam's first steps, ~lr * sign(g), would hide a wrong scale), whose momentum the
  resume must restore;
- resumed, only the third step runs, counted from where the checkpoint left the data and the completions, and it
  ends where an uninterrupted one-process run of 3 steps ends;
- where the engine is bound, the variables vLLM's external launcher reads (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``) hold what the cluster environment Lightning detected says; under SLURM nothing
  but ``capo_lightning.scale.launch.export_rank_environment`` sets ``RANK`` and ``LOCAL_RANK``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from capo_lightning import keys
from capo_lightning.commands.cli import main
from capo_lightning.commands.export import read_checkpoint
from capo_lightning.models.policy import PolicySpec, load_policy
from capo_lightning.report.runs import load_run
from capo_lightning.scale.launch import RANK_VARIABLES, STAMP_VARIABLE
from tests.conftest import ROOT
from tests.helpers import read_csv_metrics

BASE = ROOT / "conf/debug/tiny_cpu.yaml"
PROMPTS, GROUP = 2, 4  # per rank and step, as in BASE
LAUNCH_TIMEOUT_S = 400
CLOCKS = ("UTC0", "SKW-1")  # POSIX TZ strings: rank 1's clock reads one hour later than rank 0's
SLURM_JOB = "4242"


def _fit_args(model_dir: Path, root: Path | str, record: Path, steps: int, *extra: str) -> list[str]:
    """``capo fit`` on the tiny model with completions fixed by their prompts, length rewards and plain SGD with
    momentum at a constant rate (the same schedule whatever ``max_steps``), no validation."""
    return [
        "fit", "--config", str(BASE), f"--model.policy.name_or_path={model_dir}",
        "--model.engine=tests.helpers.ScriptedEngine", f"--model.engine.init_args.record_dir={record}",
        "--data.reward_fn=tests.helpers.length_reward", "--model.optimizer=torch.optim.SGD",
        "--model.optimizer.init_args.lr=0.1", "--model.optimizer.init_args.momentum=0.9", "--model.lr_scheduler=null",
        "--trainer.limit_val_batches=0", f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root}", *extra,
    ]  # fmt: skip


def _overlay(trainer: str, launcher: str) -> list[str]:
    """The shipped overlay with the CPU overrides: 2 CPU processes (one per node; Lightning's own launcher: both on
    one node), gloo, fp32 (FSDP2's bf16 compute as well: one process is matched to 1e-5)."""
    devices, nodes = (2, 1) if launcher == "lightning" else (1, 2)
    extra = [
        "--config", str(ROOT / f"conf/trainer/{trainer}.yaml"), "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}", f"--trainer.num_nodes={nodes}", "--trainer.precision=32-true",
        "--trainer.strategy.init_args.process_group_backend=gloo",
    ]  # fmt: skip
    return extra + (["--trainer.strategy.init_args.param_dtype=float32"] if trainer == "fsdp" else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(rank: int) -> dict[str, str]:
    """This test process's environment without any launcher's variables, on rank ``rank``'s clock."""
    launcher = (*RANK_VARIABLES, "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", STAMP_VARIABLE)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in launcher and not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
    }
    return env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TZ": CLOCKS[rank]}


def _torchrun(rank: int, port: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Node ``rank``'s agent, as docs/scaling.md's multi-node line runs it (a static rendezvous: the node rank is
    given, not assigned)."""
    agent = [
        str(Path(sys.executable).with_name("torchrun")), "--nnodes", "2", "--node-rank", str(rank),
        "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
    ]  # fmt: skip
    return [*agent, "-m", "capo_lightning", *argv], _environment(rank)


def _srun(rank: int, port: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Task ``rank`` of ``srun python -m capo_lightning ...`` in a job of 2 nodes x 1 task: the variables srun sets
    (a job name other than "bash"/"interactive", which Lightning would take for an interactive session) and the
    MASTER_PORT a batch script exports; MASTER_ADDR is left to Lightning (the first node of the node list)."""
    slurm = dict(
        SLURM_JOB_ID=SLURM_JOB, SLURM_JOB_NAME="capo-launch", SLURM_STEP_ID="0", SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_PROCID=str(rank),
        SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_JOB_NODELIST="127.0.0.[1-2]",
        SLURM_NODELIST="127.0.0.[1-2]", MASTER_PORT=str(port),
    )  # fmt: skip
    return [sys.executable, "-m", "capo_lightning", *argv], _environment(rank) | slurm


def _lightning(rank: int, port: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``capo fit`` alone: Lightning's own launcher starts rank 1 (same command, rank 0's environment, port of its
    own choosing)."""
    return [sys.executable, "-m", "capo_lightning", *argv], _environment(rank)


Launcher = Callable[[int, int, list[str]], tuple[list[str], dict[str, str]]]
# the processes the test starts: one a node under torchrun and srun; Lightning's launcher starts rank 1 itself
LAUNCHERS: dict[str, tuple[Launcher, int]] = {
    "torchrun": (_torchrun, 2),
    "srun": (_srun, 2),
    "lightning": (_lightning, 1),
}


def _launch(launcher: str, argv: list[str], port: int, logs: Path) -> None:
    """The launch's processes at once; each must exit 0."""
    procs, files = [], []
    start, count = LAUNCHERS[launcher]
    for rank in range(count):
        command, env = start(rank, port, argv)
        files.append((logs / f"{launcher}-rank{rank}.log").open("w"))
        procs.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=files[-1], stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    try:
        for proc in procs:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        for proc, file in zip(procs, files):
            if proc.poll() is None:  # a hang: the agent and the workers it started, by their process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            file.close()
    for rank, proc in enumerate(procs):
        log = (logs / f"{launcher}-rank{rank}.log").read_text()
        assert proc.returncode == 0, f"{launcher} rank {rank} exited {proc.returncode}:\n{log[-5000:]}"


def _policy(checkpoint: Path | dict) -> dict[str, torch.Tensor]:
    state = read_checkpoint(checkpoint)["state_dict"] if isinstance(checkpoint, Path) else checkpoint
    return {k: v.detach().float() for k, v in state.items() if k.startswith("policy.")}


def _assert_same_update(got: dict, want: dict, start: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())[:4]}"
    keys = sorted(want)
    moved = torch.cat([(got[k] - start[k]).reshape(-1) for k in keys])
    expected = torch.cat([(want[k] - start[k]).reshape(-1) for k in keys])
    assert float(expected.abs().max()) > 1e-4, f"{what}: the reference update is ~0, the comparison would be vacuous"
    rel = float((moved - expected).norm() / expected.norm())
    assert rel < 1e-5, f"{what}: relative update error {rel:.2e}"


def _train_rows(folder: Path) -> list[dict[str, float]]:
    return [r for r in read_csv_metrics(folder / "logs") if "train/completions_total" in r]


def _untimed(row: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if not keys.measured(k)}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process on the whole global batch (2 ranks' prompts: 4 a step), 2 steps and, uninterrupted, 3."""
    folder = tmp_path_factory.mktemp("one_process")
    start = {f"policy.{k}": v for k, v in load_policy(PolicySpec(str(tiny_model_dir)))[0].state_dict().items()}
    ends = {}
    for steps in (2, 3):
        root = folder / f"steps{steps}"
        main(_fit_args(tiny_model_dir, root, folder / "env", steps, f"--data.prompts_per_step={2 * PROMPTS}"))
        ends[steps] = _policy(root / "checkpoints/last.ckpt")
        totals = [r["train/completions_total"] for r in _train_rows(root)]
        assert totals == [2 * PROMPTS * GROUP * (step + 1) for step in range(steps)]
    return dict(start=_policy(start), ends=ends)


@pytest.mark.parametrize(
    "launcher, trainer",
    [("torchrun", "fsdp"), ("torchrun", "ddp"), ("srun", "fsdp"), ("lightning", "fsdp")],
    ids=["torchrun-fsdp", "torchrun-ddp", "srun-fsdp", "lightning-fsdp"],
)
def test_a_launch_of_two_processes_trains_resumes_and_exports_the_rank_variables(
    tiny_model_dir: Path, tmp_path: Path, one_process: dict, launcher: str, trainer: str
) -> None:
    runs, record = tmp_path / "runs", tmp_path / "env"
    port = _free_port()
    _launch(
        launcher,
        _fit_args(tiny_model_dir, runs / "{run}-{stamp}", record, 2, *_overlay(trainer, launcher)),
        port,
        tmp_path,
    )

    # one run folder, stamped alike on both ranks: rank 0's clock under torchrun, the job step under SLURM
    (folder,) = runs.iterdir()
    stamp = rf"job{SLURM_JOB}\.0" if launcher == "srun" else r"\d{8}-\d{6}"
    assert re.fullmatch(rf"GRPO-none-lr0\.1x8-s0-{stamp}", folder.name), folder.name
    last = folder / "checkpoints/last.ckpt"
    if trainer == "fsdp":  # both ranks' shards in that one folder
        assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    rows = _train_rows(folder)
    assert [r["step"] for r in rows] == [1.0, 2.0]
    assert [r["train/completions_total"] for r in rows] == [2 * PROMPTS * GROUP, 4 * PROMPTS * GROUP]  # both ranks
    _assert_same_update(_policy(last), one_process["ends"][2], one_process["start"], f"{launcher} {trainer}")

    # every rank named its run folder with that stamp; a vLLM engine bound where this one was would read the rank
    # variables of Lightning's cluster environment
    seen = [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(2)]
    if launcher == "lightning":  # the port Lightning chose, the same on both ranks
        port = int(seen[0]["MASTER_PORT"])
    for rank, variables in enumerate(seen):
        assert folder.name.endswith(f"-{variables.pop(STAMP_VARIABLE)}"), (rank, folder.name)
        local_rank = rank if launcher == "lightning" else 0
        assert variables == dict(
            RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), process_group=[rank, 2],
        ), (rank, variables)  # fmt: skip

    # the same launch resumes the run from its last checkpoint: only step 3 runs, as the uninterrupted run's 3rd
    argv = _fit_args(tiny_model_dir, folder, record, 3, *_overlay(trainer, launcher), "--ckpt_path=last")
    _launch(launcher, argv, _free_port(), tmp_path)
    assert list(runs.iterdir()) == [folder]
    first, rows = rows, _train_rows(folder)
    # DurableLog: step 2's checkpoint was saved before Lightning logged step 2, so the resumed launch logs that row
    # again, first (the same values, timings aside); the joined log has each step once
    assert [r["step"] for r in rows] == [2.0, 3.0]
    assert _untimed(rows[0]) == _untimed(first[1])
    assert [r["train/completions_total"] for r in rows] == [4 * PROMPTS * GROUP, 6 * PROMPTS * GROUP]
    joined = [r["step"] for r in load_run(folder).rows if "train/completions_total" in r]
    assert joined == [1.0, 2.0, 3.0]
    assert read_checkpoint(last)["global_step"] == 3
    _assert_same_update(_policy(last), one_process["ends"][3], one_process["start"], f"{launcher} {trainer} resumed")


def test_the_documented_launch_lines_are_the_ones_started_here() -> None:
    """docs/scaling.md's multi-node torchrun line gives the agent the flags the test's agents get (a static
    rendezvous), and its SLURM line runs what the emulated tasks run."""
    lines = (ROOT / "docs/scaling.md").read_text().splitlines()
    (documented,) = [line for line in lines if line.startswith("torchrun --nnodes")]
    agent, _ = _torchrun(0, 29500, [])
    assert [t for t in shlex.split(documented.split(" -m ")[0]) if t.startswith("--")] == [
        t for t in agent if t.startswith("--")
    ]
    assert any(line.startswith("srun python -m capo_lightning fit ") for line in lines)
    assert _srun(0, 29500, [])[0] == [sys.executable, "-m", "capo_lightning"]
