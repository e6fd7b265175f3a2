"""The grading server that :class:`~capo_lightning.rewards.verifier.GradingPool` starts:
``python -m`` this module.

Protocol, one JSON document per line on stdin and stdout:

* the server imports ``math_verify`` (warm sympy caches), then prints ``{"ready": true}``;
* each request is ``{"timeout": seconds, "pairs": [[pred, gold], ...]}``;
* for each pair, in order, the server prints ``{"equal": bool, "status": str, "seconds": float}``.
  Status is ``ok``, ``pred_unparsed`` or ``gold_unparsed`` (from
  :func:`~capo_lightning.rewards.grading.symbolic_verdict`), ``timeout`` or ``error``.

Each comparison runs in a child forked from this warm, single-threaded server, so a fresh
child costs milliseconds, not the 1-2 s of importing sympy. The server waits on the child's
result pipe with ``select`` and SIGKILLs it at the deadline: a hard wall-clock bound that does
not depend on signals reaching the grading thread. The child is reused until it times out or
dies. End of stdin (the trainer exited or closed the pool) ends the server and its child.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import signal
import sys
import time

from capo_lightning.faults import inject
from capo_lightning.rewards.grading import symbolic_verdict


class _Child:
    """A forked grader reading ``[pred, gold]`` lines from one pipe and answering on another."""

    def __init__(self, memory_limit_mb: int) -> None:
        request_read, self._request = os.pipe()
        self._result, result_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: never returns
            os.close(self._request)
            os.close(self._result)
            _child_loop(request_read, result_write, memory_limit_mb)
        os.close(request_read)
        os.close(result_write)
        self._reader = os.fdopen(self._result, "rb")

    def grade(self, pred: str, gold: str, timeout: float) -> dict:
        """Send one pair; the verdict, or status ``timeout``/``error`` (then the child is dead)."""
        start = time.perf_counter()
        try:
            os.write(self._request, json.dumps([pred, gold]).encode() + b"\n")
            ready, _, _ = select.select([self._reader], [], [], timeout)
            line = self._reader.readline() if ready else b""
        except OSError:
            line, ready = b"", True
        seconds = time.perf_counter() - start
        if not line:
            self.kill()
            return {
                "equal": False,
                "status": "timeout" if not ready else "error",
                "seconds": seconds,
            }
        result = json.loads(line)
        result["seconds"] = seconds
        return result

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self._request)
        self._reader.close()
        self.pid = -1


def _child_loop(request_fd: int, result_fd: int, memory_limit_mb: int) -> None:
    """Grade pairs until the server closes the request pipe; then exit without cleanup."""
    _die_with_parent()
    if memory_limit_mb > 0:  # a runaway sympy expansion fails with MemoryError instead of swapping
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests = os.fdopen(request_fd, "rb")
    for line in requests:
        try:
            pred, gold = json.loads(line)
            equal, status = symbolic_verdict(pred, gold)
            result = {"equal": bool(equal), "status": status}
        except BaseException as error:  # noqa: BLE001 - report, never die on a bad input
            result = {"equal": False, "status": "error", "error": type(error).__name__}
        os.write(result_fd, json.dumps(result).encode() + b"\n")
    os._exit(0)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a child stuck in sympy never outlives
    the server.

    Only for the forked children: PR_SET_PDEATHSIG fires when the parent *thread* exits, and the
    server may have been started from a short-lived trainer thread; the server ends on stdin EOF.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> None:
    """Serve requests on stdin until it closes."""
    logging.disable(logging.WARNING)  # math_verify warns about disabled timeouts on every call
    memory_limit_mb = int(os.environ.get("CAPO_GRADER_MEMORY_MB", "4096"))
    symbolic_verdict("\\frac{1}{2}", "0.5")  # import and warm sympy before forking children
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    child: _Child | None = None
    for line in sys.stdin.buffer:
        request = json.loads(line)
        for pred, gold in request["pairs"]:
            inject("grader")
            child = child if child is not None and child.pid > 0 else _Child(memory_limit_mb)
            out.write(
                json.dumps(child.grade(pred, gold, float(request["timeout"]))).encode() + b"\n"
            )
            out.flush()
    if child is not None and child.pid > 0:
        child.kill()


if __name__ == "__main__":
    main()
