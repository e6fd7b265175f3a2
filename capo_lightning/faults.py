"""Fault injection: named places in a run where a test (or a user rehearsing a failure) can make the
process die or fail on purpose, reproducibly. They do nothing unless ``CAPO_FAULT`` names one.

``CAPO_FAULT=<point>:<n>[:<action>]`` acts at the ``n``-th time (counted from 1, in this process)
the run reaches ``point``; ``CAPO_FAULT_RANK=<r>`` limits it to global rank ``r`` (default: all).
Actions: ``kill`` (default: ``SIGKILL`` to this process, the preemption nothing can catch),
``term`` (``SIGTERM``, the polite preemption), ``requeue`` (``SIGUSR1``, SLURM's requeue signal),
``raise`` (a :class:`InjectedFault`, an ordinary crash), ``enospc`` (an ``OSError(ENOSPC)``, a
simulated full disk, at places that write).

The points, in the order a step reaches them: ``generation`` (before the engine generates),
``grading`` (before the rewards are computed), ``forward`` (each scoring forward of the policy or
the reference), ``backward`` (each backward), ``optimizer_step`` (before the optimizer steps),
``weight_sync`` (before the engine receives new weights), ``checkpoint_write`` (as a checkpoint's
contents are gathered, before the file is written), ``checkpoint_shard`` (each rank, once its part
of a checkpoint is on disk and before the checkpoint is committed: with several ranks, a kill on one
leaves the others' shards written and nothing committed); ``grader`` (in a grading server
process, before each symbolic comparison: ``kill`` there is a grader dying mid-batch, which the run
survives).

``CAPO_FAULT_TRACE=<file>`` appends each point reached to ``<file>``, one name a line: how a test
learns how often a run reaches each point before it picks where to strike.
"""

from __future__ import annotations

import errno
import os
import signal

VARIABLE = "CAPO_FAULT"
RANK_VARIABLE = "CAPO_FAULT_RANK"
TRACE_VARIABLE = "CAPO_FAULT_TRACE"
POINTS = (
    "generation",
    "grading",
    "forward",
    "backward",
    "optimizer_step",
    "weight_sync",
    "checkpoint_write",
    "checkpoint_shard",
    "grader",
)
SERVER_POINTS = ("grader",)  # reached in a helper process the run outlives, not in the run itself
RUN_POINTS = tuple(point for point in POINTS if point not in SERVER_POINTS)
_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "requeue": signal.SIGUSR1}
ACTIONS = (*_SIGNALS, "raise", "enospc")
_reached: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """The ordinary crash ``CAPO_FAULT=<point>:<n>:raise`` causes."""


def inject(point: str, path: str | None = None) -> None:
    """Count one arrival at ``point``; act if ``CAPO_FAULT`` names it and this is its ``n``-th.

    Args:
        point: One of :data:`POINTS`.
        path: The file or folder being written, named by a simulated ``ENOSPC``.
    """
    trace, spec = os.environ.get(TRACE_VARIABLE), os.environ.get(VARIABLE)
    if trace:
        with open(trace, "a") as handle:
            handle.write(point + "\n")
    if not spec:
        return
    target, n, action = parse(spec)
    if target != point or not _this_rank():
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] != n:
        return
    if action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {VARIABLE})", path)
    elif action == "raise":
        raise InjectedFault(f"injected by {VARIABLE}={spec}")


def parse(spec: str) -> tuple[str, int, str]:
    """``"<point>:<n>[:<action>]"`` -> (point, n, action), or a ValueError naming the fix."""
    parts = spec.split(":")
    point, count = (parts + [""])[:2]
    action = parts[2] if len(parts) > 2 else "kill"
    if point not in POINTS or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
        raise ValueError(
            f"{VARIABLE}={spec!r}: expected '<point>:<n>[:<action>]' with point one of {POINTS}, "
            f"n >= 1 and action one of {ACTIONS}, e.g. 'backward:3:kill'"
        )
    return point, int(count), action


def _this_rank() -> bool:
    wanted = os.environ.get(RANK_VARIABLE)
    if wanted is None:
        return True
    import torch.distributed as dist  # noqa: PLC0415 (only when a rank is named)

    # Lightning's own launcher sets no RANK: the process group knows
    started = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if started else os.environ.get("RANK", "0")
    return wanted == str(rank)
