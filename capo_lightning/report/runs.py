"""Find one run's CSV log and resolved config, and read them (plain files only: no Lightning, no torch)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from capo_lightning.report.versions import version, with_earlier_versions

X_KEY = "train/completions_total"  # the x axis of every figure: cumulative completions, all ranks
NON_MASKING_SELECTORS = ("KeepAll",)  # selectors that keep every token even when they "enforce"
_EXPECTED = (
    "pass the run's trainer.default_root_dir (it holds logs/version_N/metrics.csv), a version_N folder, "
    "or a metrics.csv path"
)


@dataclass
class Run:
    """One training run: its metric rows and what its config says about it.

    Attributes:
        path: the folder holding ``metrics.csv`` (normally ``<root>/logs/version_N``).
        rows: one dict per CSV row, metric key -> float; a key whose cell is empty is left out of that row.
        objective: the objective's class name (``"GRPO"``), ``"unknown"`` without a config.
        selector: ``"none"`` without a selector, else its class name without the ``Selector`` suffix
            (``"CAPO"``, ``"KeepAll"``), and ``"<name> (monitor)"`` when its ``init_args.enforce`` is false.
        enforces: whether the selector masks tokens (a selector other than KeepAll, ``enforce`` not false).
        regime: the config's top-level ``regime``, else ``"lr <lr>, <prompts_per_step * group_size>/step"``.
        seed: the config's ``seed_everything`` (None when absent).
        notes: what was odd about reading this run (missing config, ...).
    """

    path: Path
    rows: list[dict[str, float]]
    objective: str = "unknown"
    selector: str = "none"
    enforces: bool = False
    regime: str = "unknown"
    seed: Any = None
    notes: list[str] = field(default_factory=list)

    def has(self, key: str) -> bool:
        """Whether any row of the run holds ``key``."""
        return any(key in row for row in self.rows)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The raw values of ``key`` against completions, sorted by completions.

        A row's x is its own ``train/completions_total``; a row without it (a validation row) takes the
        completions of the training row with the same ``step``, 0 at step 0 (see ``completions_at_step``).
        Rows with equal x keep their order in the file (stable sort). Non-finite values (the grad norm of a
        skipped step) are left out, so one of them cannot poison a smoothed curve.

        Args:
            key: a metric column of ``metrics.csv``.

        Returns:
            ``(x, y)``, two float arrays of equal length (empty when no row holds ``key``).
        """
        table = _step_table(self.rows)
        points = []
        for row in self.rows:
            if key not in row:
                continue
            x = row.get(X_KEY)
            if x is None and "step" in row:
                x = completions_at_step(row["step"], table)
            if x is not None and np.isfinite(row[key]):
                points.append((x, row[key]))
        x_values = np.array([point[0] for point in points], dtype=float)
        y_values = np.array([point[1] for point in points], dtype=float)
        order = np.argsort(x_values, kind="stable")
        return x_values[order], y_values[order]


def _step_table(rows: list[dict[str, float]]) -> dict[float, float]:
    """step -> completions_total of the training rows that hold both (the last such row of a step wins)."""
    return {row["step"]: row[X_KEY] for row in rows if "step" in row and X_KEY in row}


def completions_at_step(step: float, table: dict[float, float]) -> float | None:
    """The completions a validation row at ``step`` stands for.

    The training row with the same step gives it; step 0 without such a row is the base model, 0
    completions. A step between logged training rows (``log_every_n_steps`` > 1) is interpolated linearly
    on (step, completions), with (0, 0) added when no step-0 row exists; beyond the last training row the
    last segment's slope is extended.

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
    for pattern in ("version_*/metrics.csv", "logs/version_*/metrics.csv", "*/version_*/metrics.csv"):
        found = [csv_path for csv_path in path.glob(pattern) if version(csv_path.parent) is not None]
        loggers = sorted({str(csv_path.parent.parent) for csv_path in found})
        if len(loggers) > 1:
            raise ValueError(
                f"RUN_DIR {path} holds CSV logs of several loggers ({', '.join(loggers)}); "
                f"pass the version folder of the run you mean, e.g. {found[0].parent}"
            )
        if found:
            return max(found, key=lambda csv_path: version(csv_path.parent))
    raise FileNotFoundError(
        f"RUN_DIR {path} has no metrics.csv: expected {path / 'logs' / 'version_N' / 'metrics.csv'} "
        f"(what `capo fit` writes with trainer.default_root_dir={path} and the CSV logger); {_EXPECTED}"
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
        raise ValueError(f"{metrics_path} has no rows: the run logged nothing (did it stop before its first step?)")
    return rows


def _class_name(entry: Any) -> str | None:
    """``a.b.GRPO`` -> ``GRPO`` for a ``class_path`` entry (dict) or a bare class path string."""
    path = entry.get("class_path") if isinstance(entry, dict) else entry
    return str(path).rpartition(".")[2] if path else None


def _nested(config: dict, *keys: str) -> Any:
    """``config[k0][k1]...``, None where a level is missing or not a mapping."""
    value: Any = config
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _regime(config: dict) -> str:
    """The named regime, else ``"lr 2e-05, 32/step"`` from the learning rate and completions per step."""
    named = config.get("regime")
    if isinstance(named, dict):
        named = named.get("name")
    if named:  # a regime without a name ("", the CLI's default) is no regime
        return str(named)
    parts = []
    lr = _nested(config, "model", "optimizer", "init_args", "lr")
    try:
        parts.append(f"lr {float(lr):g}")
    except (TypeError, ValueError):
        pass
    prompts, group = _nested(config, "data", "prompts_per_step"), _nested(config, "data", "group_size")
    if isinstance(prompts, int) and isinstance(group, int):
        parts.append(f"{prompts * group}/step")
    return ", ".join(parts) or "default"


def describe(run: Run, config: dict) -> None:
    """Fill the run's objective, selector, enforces, regime and seed from its resolved config.

    Args:
        run: the run to fill in place.
        config: the parsed ``config.yaml`` that LightningCLI wrote next to ``metrics.csv``.
    """
    run.objective = _class_name(_nested(config, "model", "objective")) or "unknown"
    selector = _nested(config, "model", "selector")
    name = _class_name(selector)
    if name is None:
        run.selector, run.enforces = "none", False
    else:
        name = name.removesuffix("Selector") or name
        enforce = _nested(selector, "init_args", "enforce") if isinstance(selector, dict) else None
        run.enforces = enforce is not False and name not in NON_MASKING_SELECTORS
        run.selector = f"{name} (monitor)" if enforce is False else name
        thresholds = _thresholds(selector)
        if run.enforces and thresholds:  # one selector with other thresholds is another configuration
            run.selector = f"{name} {thresholds}"
    run.regime = _regime(config)
    run.seed = config.get("seed_everything")


def _thresholds(selector: Any) -> str:
    """``δF 0.0001 τH 0.01`` from a CAPO-like selector's init_args ("" when it has none)."""
    init = _nested(selector, "init_args") if isinstance(selector, dict) else None
    if not isinstance(init, dict) or "delta_f" not in init or "tau_h" not in init:
        return ""
    return f"δF {float(init['delta_f']):g} τH {float(init['tau_h']):g}"


def load_run(run_dir: str | Path) -> Run:
    """Read the run a RUN_DIR argument names: its ``metrics.csv`` and the ``config.yaml`` next to it.

    Args:
        run_dir: a run root, a ``version_N`` folder or a ``metrics.csv`` path (see ``find_metrics``).

    Returns:
        The run; without a readable ``config.yaml`` its objective and regime are ``"unknown"`` and a note says so.
    """
    metrics_path = find_metrics(run_dir)
    rows, paths = with_earlier_versions(metrics_path, read_rows)
    run = Run(path=metrics_path.parent, rows=rows)
    if len(paths) > 1:
        run.notes.append(f"{metrics_path.parent.parent}: versions {', '.join(p.parent.name for p in paths)} joined")
    if not any(X_KEY in row for row in run.rows):
        run.notes.append(
            f"{metrics_path} has no {X_KEY} yet, the x axis of every figure (a run before its first logged "
            "training step, or logs of a version that did not log it): only its step-0 rows can be placed"
        )
    config_path = metrics_path.parent / "config.yaml"
    if not config_path.is_file():
        run.notes.append(f"{config_path} is missing: objective, selector, regime and seed of this run are unknown")
        return run
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        run.notes.append(f"{config_path} could not be parsed ({error}); the run is grouped as unknown")
        return run
    if isinstance(config, dict):
        describe(run, config)
    return run
