"""Find a run's CSV log (the newest ``logs/version_N/metrics.csv`` below a RUN_DIR), read its rows,
and place its rows on the completions axis."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from capo_lightning import keys
from capo_lightning.report.versions import version

X_KEY = keys.COMPLETIONS  # the x axis of every figure: cumulative completions, all ranks

_EXPECTED = (
    "pass the run's trainer.default_root_dir (it holds logs/version_N/metrics.csv), a version_N "
    "folder, or a metrics.csv path"
)


def find_metrics(run_dir: str | Path) -> Path:
    """The ``metrics.csv`` a RUN_DIR argument names.

    Accepted: a ``metrics.csv`` path; a folder holding one (a ``version_N`` folder); a folder with
    ``version_N/metrics.csv``, ``logs/version_N/metrics.csv`` or ``<logger>/version_N/metrics.csv``
    below it, of which the highest N is taken; ``load_run`` joins the earlier versions before it (a
    resumed run writes a new version; see :mod:`capo_lightning.report.versions`).

    Args:
        run_dir: the path given on the command line.

    Returns:
        The path of the run's ``metrics.csv``.

    Raises:
        FileNotFoundError: the path does not exist or holds no CSV log.
        ValueError: CSV logs of several logger folders lie below it (ambiguous).
    """
    path = Path(run_dir)
    if path.is_file():
        if path.name == "metrics.csv":
            return path
        raise FileNotFoundError(f"RUN_DIR {path} is a file but not a metrics.csv; {_EXPECTED}")
    if not path.is_dir():
        raise FileNotFoundError(f"RUN_DIR {path} does not exist; {_EXPECTED}")
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    for pattern in (
        "version_*/metrics.csv",
        "logs/version_*/metrics.csv",
        "*/version_*/metrics.csv",
    ):
        found = [
            csv_path for csv_path in path.glob(pattern) if version(csv_path.parent) is not None
        ]
        loggers = sorted({str(csv_path.parent.parent) for csv_path in found})
        if len(loggers) > 1:
            raise ValueError(
                f"RUN_DIR {path} holds CSV logs of several loggers ({', '.join(loggers)}); "
                f"pass the version folder of the run you mean, e.g. {found[0].parent}"
            )
        if found:
            return max(found, key=lambda csv_path: version(csv_path.parent))
    raise FileNotFoundError(
        f"RUN_DIR {path} has no metrics.csv: expected "
        f"{path / 'logs' / 'version_N' / 'metrics.csv'} (what `capo fit` writes with "
        f"trainer.default_root_dir={path} and the CSV logger); {_EXPECTED}"
    )


def read_rows(metrics_path: Path) -> list[dict[str, float]]:
    """The rows of a Lightning CSVLogger ``metrics.csv``, empty and non-numeric cells left out.

    Args:
        metrics_path: the CSV file.

    Returns:
        One dict per row, column -> float.

    Raises:
        ValueError: the file has no header or no row.
    """
    with metrics_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for raw in reader:
            row = {}
            for key, cell in raw.items():
                if key is None or cell is None or cell.strip() == "":
                    continue
                try:
                    row[key] = float(cell)
                except ValueError:
                    continue
            rows.append(row)
    if not rows:
        raise ValueError(
            f"{metrics_path} has no rows: the run logged nothing (did it stop before its first "
            "step?)"
        )
    return rows


def step_table(rows: list[dict[str, float]]) -> dict[float, float]:
    """step -> completions_total of the training rows that hold both (the last such row of a step
    wins)."""
    return {row["step"]: row[X_KEY] for row in rows if "step" in row and X_KEY in row}


def completions_at_step(step: float, table: dict[float, float]) -> float | None:
    """The completions a validation row at ``step`` stands for.

    The training row with the same step gives it; step 0 without such a row is the base model, 0
    completions. A step between logged training rows (``log_every_n_steps`` > 1) is interpolated
    linearly on (step, completions), with (0, 0) added when no step-0 row exists; beyond the last
    training row the last segment's slope is extended.

    Args:
        step: the row's ``step`` column.
        table: step -> completions of the run's training rows.

    Returns:
        The completions, or None when the run has no training row to take them from.
    """
    if step in table:
        return table[step]
    if step == 0:
        return 0.0
    anchors = dict(table)
    anchors.setdefault(0.0, 0.0)
    if len(anchors) < 2:
        return None
    steps = np.array(sorted(anchors), dtype=float)
    completions = np.array([anchors[value] for value in steps], dtype=float)
    if step <= steps[-1]:
        return float(np.interp(step, steps, completions))
    slope = (completions[-1] - completions[-2]) / (steps[-1] - steps[-2])
    return float(completions[-1] + slope * (step - steps[-1]))
