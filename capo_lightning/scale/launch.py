"""What the processes of one launch agree on: the run's stamp, and the rank variables vLLM reads.

A run folder written as ``runs/{run}-{stamp}`` must be one folder on every rank, but each process
of a torchrun or SLURM launch resolves its config alone, before any process group exists, and
their clocks need not show the same second. :func:`run_stamp` gives every process the same stamp:

1. ``CAPO_RUN_STAMP`` when set: the launcher's (``export CAPO_RUN_STAMP=...`` before ``srun``),
   or rank 0's, inherited by the processes Lightning's own launcher starts (one node, several
   devices);
2. under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``): rank 0's own clock, handed to the others
   through the store torchrun's agent already hosts at ``MASTER_ADDR:MASTER_PORT`` (the one
   ``torch.distributed``'s ``env://`` rendezvous joins later);
3. as one of several SLURM tasks (``SLURM_PROCID``, ``SLURM_NTASKS`` > 1): ``job<id>.<step>``, the
   job and step ids every task of an ``srun`` step shares;
4. otherwise (one process) its own clock.

:func:`export_rank_environment` puts ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment from the cluster environment Lightning detected. vLLM's
``external_launcher`` reads them; torchrun sets them all, but under SLURM Lightning reads
``SLURM_PROCID`` and ``SLURM_LOCALID`` and exports neither ``RANK`` nor ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

STAMP_VARIABLE = "CAPO_RUN_STAMP"
STAMP_FORMAT = "%Y%m%d-%H%M%S"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_STORE_KEY = "capo_lightning/run_stamp"
# how long a rank waits for rank 0's stamp (rank 0 reaches the same point of the same command)
_STORE_TIMEOUT = timedelta(minutes=10)


def run_stamp(
    environ: MutableMapping[str, str] | None = None, clock: Callable[[], float] = time.time
) -> str:
    """The run's start stamp, the same on every process of one launch (see the module's
    docstring); left in ``CAPO_RUN_STAMP``, so that processes started from this one inherit it."""
    environ = os.environ if environ is None else environ
    stamp = environ.get(STAMP_VARIABLE) or _agreed_stamp(environ, clock)
    environ[STAMP_VARIABLE] = stamp
    return stamp


@contextmanager
def stamp_scope(environ: MutableMapping[str, str] | None = None) -> Iterator[None]:
    """One command's stamp: the ``CAPO_RUN_STAMP`` that :func:`run_stamp` leaves for the processes
    the command starts is taken back when the command ends (a launcher's own value is kept), so a
    later command in the same process (a notebook, a test) stamps its own run."""
    environ = os.environ if environ is None else environ
    given = environ.get(STAMP_VARIABLE)
    try:
        yield
    finally:
        if given is None:
            environ.pop(STAMP_VARIABLE, None)
        else:
            environ[STAMP_VARIABLE] = given


def _agreed_stamp(environ: MutableMapping[str, str], clock: Callable[[], float]) -> str:
    own = time.strftime(STAMP_FORMAT, time.localtime(clock()))
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and _count(environ, "WORLD_SIZE") > 1:
        return _through_agent_store(environ, own)
    if "SLURM_PROCID" in environ and _count(environ, "SLURM_NTASKS") > 1:
        job, step = environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID")
        if job:
            return f"job{job}.{step}" if step else f"job{job}"
    return own


def _count(environ: MutableMapping[str, str], name: str) -> int:
    value = environ.get(name, "1")
    return int(value) if value.isdigit() else 1


def _through_agent_store(environ: MutableMapping[str, str], own: str) -> str:
    """Rank 0's stamp (``own`` on rank 0), through torchrun's agent store: rank 0 writes it unless
    a restarted rank 0 finds it there already, the others wait for it."""
    from torch.distributed import TCPStore

    store = TCPStore(
        environ["MASTER_ADDR"],
        int(environ["MASTER_PORT"]),
        is_master=False,
        timeout=_STORE_TIMEOUT,
    )
    if environ.get("RANK") == "0":
        return store.compare_set(_STORE_KEY, "", own).decode()
    return store.get(_STORE_KEY).decode()


def export_rank_environment(
    strategy: Any, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` from
    ``strategy.cluster_environment`` (what Lightning detected: torchrun, SLURM, its own launcher),
    for code that reads the variables rather than Lightning: vLLM's ``external_launcher``. Returns
    what it set; nothing for one process (no cluster environment, or a world of one), whose
    environment is left as it was."""
    environ = os.environ if environ is None else environ
    cluster = getattr(strategy, "cluster_environment", None)
    if cluster is None or cluster.world_size() < 2:
        return {}
    values = {
        "RANK": cluster.global_rank(),
        "LOCAL_RANK": cluster.local_rank(),
        "WORLD_SIZE": cluster.world_size(),
        "MASTER_ADDR": cluster.main_address,
        "MASTER_PORT": cluster.main_port,
    }
    exported = {name: str(value) for name, value in values.items()}
    environ.update(exported)
    return exported
