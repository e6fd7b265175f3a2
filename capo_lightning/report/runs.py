"""Find one run's CSV log and resolved config, and read them (plain files only: no Lightning, no
torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from capo_lightning.report.csvlog import (
    X_KEY,
    completions_at_step,
    find_metrics,
    read_rows,
    step_table,
)
from capo_lightning.report.selectors import (
    NON_MASKING_SELECTORS,
    Calibration,
    as_float,
    calibration_of,
    selector_text,
    shadow_of,
)
from capo_lightning.report.versions import with_earlier_versions

# PolicySpec's default (models/policy.py; not imported here)
DEFAULT_POLICY = "bundled:smollm2-135m-instruct"


@dataclass
class Run:
    """One training run: its metric rows and what its config says about it.

    Attributes:
        path: the folder holding ``metrics.csv`` (normally ``<root>/logs/version_N``).
        rows: one dict per CSV row, metric key -> float; a key whose cell is empty is left out of
            that row.
        objective: the objective's class name (``"GRPO"``), ``"unknown"`` without a config.
        selector: the selector as labels name it: ``"none"`` without a selector, else its class name
            without the ``Selector`` suffix (``"CAPO"``, ``"KeepAll"``). A masking selector adds the
            thresholds that run: the configured ones (``"CAPO δF 0.0001 τH 0.01"``) or, when it
            calibrates, ``calibration``'s text instead (``"CAPO auto p95"``), then
            ``" (SGD shadow)"`` for a shadow optimizer other than Adam. A measuring one
            (``init_args.enforce`` false) reads ``"<name> (monitor)"``, with the calibration, an
            advanced shadow (``"CAPO (monitor, Adam shadow)"``) or a non-Adam one inside the
            parentheses.
        enforces: whether the selector masks tokens (a selector other than KeepAll, ``enforce`` not
            false).
        regime: the config's top-level ``regime``, else
            ``"lr <lr>, <prompts_per_step * group_size>/step"``.
        seed: the config's ``seed_everything`` (None when absent).
        lr: ``model.optimizer.init_args.lr``, the effective learning rate (a regime's scale is
            already applied in a saved config); None when absent or without a config.
        policy: ``model.policy.name_or_path``, the starting policy (``DEFAULT_POLICY`` when the
            config omits it); None without a config.
        shadow: the selector's ``optimizer_model`` (``"adam"``, ``"sgd"``), CAPOSelector's
            ``"adam"`` when the config omits it; None for selectors without a shadow optimizer
            (none, KeepAll).
        calibration: the selector's calibration when ``calibration_steps > 0``, None when its
            thresholds are the configured ``delta_f`` / ``tau_h`` (``calibration_steps`` 0 or
            absent).
        advance_when_monitoring: the selector's ``advance_when_monitoring`` (False when absent): a
            measuring selector that advances its shadow optimizer as an enforcing one would.
        notes: what was odd about reading this run (missing config, ...).
    """

    path: Path
    rows: list[dict[str, float]]
    objective: str = "unknown"
    selector: str = "none"
    enforces: bool = False
    regime: str = "unknown"
    seed: Any = None
    lr: float | None = None
    policy: str | None = None
    shadow: str | None = None
    calibration: Calibration | None = None
    advance_when_monitoring: bool = False
    notes: list[str] = field(default_factory=list)

    def has(self, key: str) -> bool:
        """Whether any row of the run holds ``key``."""
        return any(key in row for row in self.rows)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The raw values of ``key`` against completions, sorted by completions.

        A row's x is its own ``train/completions_total``; a row without it (a validation row) takes
        the completions of the training row with the same ``step``, 0 at step 0 (see
        ``completions_at_step``). Rows with equal x keep their order in the file (stable sort).
        Non-finite values (the grad norm of a skipped step) are left out, so one of them cannot
        poison a smoothed curve.

        Args:
            key: a metric column of ``metrics.csv``.

        Returns:
            ``(x, y)``, two float arrays of equal length (empty when no row holds ``key``).
        """
        table = step_table(self.rows)
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
    """The named regime, else ``"lr 2e-05, 32/step"`` from the learning rate and completions per
    step."""
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
    prompts, group = (
        _nested(config, "data", "prompts_per_step"),
        _nested(config, "data", "group_size"),
    )
    if isinstance(prompts, int) and isinstance(group, int):
        parts.append(f"{prompts * group}/step")
    return ", ".join(parts) or "default"


def describe(run: Run, config: dict) -> None:
    """Fill the run's description (every ``Run`` attribute but path, rows and notes) from its
    resolved config.

    Keys the config omits (older configs lack the calibration keys) take the defaults of the class
    they configure: ``DEFAULT_POLICY``, ``DEFAULT_SHADOW``, ``DEFAULT_PERCENTILE``, no calibration,
    no advance.

    Args:
        run: the run to fill in place.
        config: the parsed ``config.yaml`` that LightningCLI wrote next to ``metrics.csv``.
    """
    run.objective = _class_name(_nested(config, "model", "objective")) or "unknown"
    selector = _nested(config, "model", "selector")
    name = _class_name(selector)
    init = _nested(selector, "init_args") if isinstance(selector, dict) else None
    init = init if isinstance(init, dict) else {}
    if name is None:
        run.selector, run.enforces = "none", False
        run.shadow, run.calibration, run.advance_when_monitoring = None, None, False
    else:
        name = name.removesuffix("Selector") or name
        enforce = init.get("enforce")
        run.enforces = enforce is not False and name not in NON_MASKING_SELECTORS
        run.shadow = shadow_of(name, init)
        run.calibration = calibration_of(init)
        run.advance_when_monitoring = init.get("advance_when_monitoring") is True
        run.selector = selector_text(name, init, run, monitor=enforce is False)
    run.regime = _regime(config)
    run.seed = config.get("seed_everything")
    run.lr = as_float(_nested(config, "model", "optimizer", "init_args", "lr"))
    policy = _nested(config, "model", "policy", "name_or_path")
    run.policy = str(policy) if policy else DEFAULT_POLICY


def load_run(run_dir: str | Path) -> Run:
    """Read the run a RUN_DIR argument names: its ``metrics.csv`` and the ``config.yaml`` next to
    it.

    Args:
        run_dir: a run root, a ``version_N`` folder or a ``metrics.csv`` path (see
            ``find_metrics``).

    Returns:
        The run; without a readable ``config.yaml`` its objective and regime are ``"unknown"`` and a
        note says so.
    """
    metrics_path = find_metrics(run_dir)
    rows, paths = with_earlier_versions(metrics_path, read_rows)
    run = Run(path=metrics_path.parent, rows=rows)
    if len(paths) > 1:
        run.notes.append(
            f"{metrics_path.parent.parent}: versions {', '.join(p.parent.name for p in paths)} "
            "joined"
        )
    if not any(X_KEY in row for row in run.rows):
        run.notes.append(
            f"{metrics_path} has no {X_KEY} yet, the x axis of every figure (a run before its "
            "first logged training step, or logs of a version that did not log it): only its "
            "step-0 rows can be placed"
        )
    config_path = metrics_path.parent / "config.yaml"
    if not config_path.is_file():
        run.notes.append(
            f"{config_path} is missing: objective, selector, regime and seed of this run are "
            "unknown"
        )
        return run
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        run.notes.append(
            f"{config_path} could not be parsed ({error}); the run is grouped as unknown"
        )
        return run
    if isinstance(config, dict):
        describe(run, config)
    return run
