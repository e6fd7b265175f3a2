"""A resumed run writes its metrics to a new ``logs/version_N``: put the versions of one run back
together.

Rule: versions are read in order, and each one replaces the earlier rows from its own first step on,
except, at that first step itself, earlier rows whose metrics it does not log again there. A resumed
run (its first row is the step after the checkpoint) thus continues the earlier rows, and rows
logged after that checkpoint by the interrupted process (steps that were redone) are replaced; a
run restarted from scratch in the same folder (its first row is step 0 or 1) replaces everything
before it. The exception serves a run resumed from a checkpoint saved before its step was logged
(:class:`capo_lightning.callbacks.DurableLog`): it logs that step's training row again, first, but
not the validation that ran after the checkpoint, which the earlier version keeps.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from pathlib import Path

Rows = list[dict[str, float]]


def version(folder: Path) -> int | None:
    """N of a ``version_N`` folder, else None."""
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else None


def with_earlier_versions(
    metrics_path: Path, read: Callable[[Path], Rows]
) -> tuple[Rows, list[Path]]:
    """The rows of ``metrics_path`` preceded by what its logger's earlier versions logged before
    them, and the files used (oldest first). A ``metrics.csv`` outside a ``version_N`` folder is
    read alone."""
    newest = version(metrics_path.parent)
    if newest is None:
        return read(metrics_path), [metrics_path]
    numbered = {
        version(p.parent): p for p in metrics_path.parent.parent.glob("version_*/metrics.csv")
    }
    paths = [numbered[n] for n in sorted(n for n in numbered if n is not None and n <= newest)]
    rows: Rows = []
    for path in paths:
        new = read(path)
        first = min((row["step"] for row in new if "step" in row), default=None)
        if first is not None:
            again = {key for row in new if row.get("step") == first for key in row} - _INDEX
            rows = [row for row in rows if _kept(row, first, again)]
        rows += new
    return rows, paths


_INDEX = {"step", "epoch"}


def _kept(row: dict[str, float], first: float, again: set[str]) -> bool:
    """An earlier row survives a later version whose rows start at step ``first`` and log the
    metrics ``again`` there: a row of an earlier step, or one of that step none of whose metrics
    the later version logs again."""
    step = row.get("step", -1.0)
    return step < first or (step == first and again.isdisjoint(set(row) - _INDEX))


def write_rows(rows: Rows, path: Path) -> None:
    """Write rows as one CSV (columns: the union, in first-seen order; missing cells empty)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(value) for key, value in row.items()})


def _cell(value: float) -> str:
    """A value as CSVLogger writes it: integers without a fraction, NaN and infinities as ``nan``,
    ``inf``, ``-inf`` (a calibrating selector logs NaN thresholds), the rest exactly (``repr``)."""
    if not math.isfinite(value):
        return repr(value)
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)
