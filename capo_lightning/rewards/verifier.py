"""A small pool of grading processes that bounds every symbolic comparison by a wall-clock timeout.

``math_verify`` runs sympy, which can take minutes (``9^{9^{9^{9}}}``) or loop. Its own timeouts
use ``signal.alarm``, which only works on the main thread of the main process: in a worker
thread it raises, and a swallowed error there once scored every MATH answer 0 in a peer library
(``peers.md`` C.11). ``multiprocessing`` pools do not help inside DataLoader workers either,
because daemonic processes may not have children.

So the pool starts plain subprocesses (``python -m capo_lightning.rewards._grader``) with
:mod:`subprocess`, which works from any thread and any process. Each server grades in a child
it forks after importing sympy, and SIGKILLs that child at the deadline; respawning it costs
milliseconds. Parent-side deadlines (timeout plus :data:`MARGIN_S` per pair) catch a server
that dies or stops answering; it is killed and replaced. POSIX only (``fork``).
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["GradingPool", "Outcome"]

MARGIN_S = 2.0
"""Extra seconds per pair the parent waits for a server before declaring it dead."""


@dataclass(frozen=True)
class Outcome:
    """The result of one symbolic comparison.

    Attributes:
        equal: the verdict (False unless status is ``ok``).
        status: ``ok``, ``pred_unparsed``, ``gold_unparsed``, ``timeout`` or ``error``.
        seconds: wall time of the comparison in the grading child.
    """

    equal: bool
    status: str
    seconds: float


class _Server:
    """One grading subprocess and the line protocol of :mod:`capo_lightning.rewards._grader`."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "capo_lightning.rewards._grader"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._buffer = b""
        self.ready = False

    def wait_ready(self, timeout: float) -> None:
        """Block until the server printed its ready line; RuntimeError if it did not in time."""
        if self.ready:
            return
        line = self._readline(time.monotonic() + timeout)
        if line is None or not json.loads(line).get("ready"):
            self.kill()
            raise RuntimeError(
                f"capo: a grading process ({sys.executable} -m capo_lightning.rewards._grader) did "
                f"not start within {timeout:.0f} s; check that math-verify imports in this "
                "environment, or raise startup_timeout_s"
            )
        self.ready = True

    def run(self, pairs: list[tuple[str, str]], timeout: float) -> list[Outcome]:
        """Grade ``pairs`` in order; if the server dies, the rest are ``error`` outcomes."""
        try:
            self.proc.stdin.write(json.dumps({"timeout": timeout, "pairs": pairs}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            return [Outcome(False, "error", 0.0)] * len(pairs)
        outcomes = []
        for _ in pairs:
            line = self._readline(time.monotonic() + timeout + MARGIN_S)
            if line is None:
                self.kill()
                break
            result = json.loads(line)
            outcomes.append(
                Outcome(bool(result["equal"]), str(result["status"]), float(result["seconds"]))
            )
        return outcomes + [Outcome(False, "error", 0.0)] * (len(pairs) - len(outcomes))

    def _readline(self, deadline: float) -> bytes | None:
        """One line from stdout by ``deadline`` (monotonic), or None on timeout or EOF."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the server (its grading child follows when its pipe closes or via PDEATHSIG)."""
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close stdin so the server exits on its own; kill it if it does not within a second."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class GradingPool:
    """Symbolic answer comparison in ``workers`` subprocesses, each pair bounded by ``timeout_s``.

    Safe to call from any thread and from DataLoader workers; calls from several threads share the
    servers. Servers start on first use (about 2 s: importing sympy) or on :meth:`start`. After a
    ``fork`` the child process gets a fresh pool instead of sharing the parent's pipes.

    Args:
        workers: grading processes; pairs of one call are split across them.
        timeout_s: wall-clock limit per comparison. A pair that runs longer is graded ``timeout``.
        startup_timeout_s: how long to wait for a server to import sympy.
    """

    def __init__(
        self, workers: int = 2, timeout_s: float = 5.0, startup_timeout_s: float = 120.0
    ) -> None:
        if workers < 1:
            raise ValueError(f"GradingPool workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"GradingPool timeout_s must be > 0, got {timeout_s}")
        self.workers, self.timeout_s, self.startup_timeout_s = workers, timeout_s, startup_timeout_s
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._idle: queue.Queue[_Server] = queue.Queue()
        self._threads: ThreadPoolExecutor | None = None

    def start(self) -> GradingPool:
        """Start the servers and wait until every one is ready."""
        with self._lock:
            # first use, or we are a forked copy: never touch the parent's servers
            if self._pid != os.getpid():
                self._idle = queue.Queue()
                servers = [_Server() for _ in range(self.workers)]
                for server in servers:
                    server.wait_ready(self.startup_timeout_s)
                    self._idle.put(server)
                self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="capo-grader")
                self._pid = os.getpid()
        return self

    def compare(self, pairs: list[tuple[str, str]]) -> list[Outcome]:
        """Grade ``(pred, gold)`` pairs symbolically; one :class:`Outcome` per pair, in order."""
        if not pairs:
            return []
        self.start()
        chunks = [pairs[i :: self.workers] for i in range(min(self.workers, len(pairs)))]
        results = list(self._threads.map(self._run_chunk, chunks))
        outcomes: list[Outcome] = [None] * len(pairs)  # type: ignore[list-item]
        for offset, chunk_outcomes in enumerate(results):
            outcomes[offset :: len(chunks)] = chunk_outcomes
        return outcomes

    def _run_chunk(self, chunk: list[tuple[str, str]]) -> list[Outcome]:
        server = self._idle.get()
        try:
            if not server.alive:
                server = _Server()
            server.wait_ready(self.startup_timeout_s)
            return server.run(chunk, self.timeout_s)
        finally:
            self._idle.put(server if server.alive else _Server())

    def close(self) -> None:
        """Stop the servers (they also stop on their own when this process exits)."""
        with self._lock:
            if self._pid == os.getpid():
                while not self._idle.empty():
                    self._idle.get_nowait().close()
                if self._threads is not None:
                    self._threads.shutdown(wait=False)
            self._pid, self._threads = None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
