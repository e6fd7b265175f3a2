"""CAPO thresholds for a model from measuring runs' own token shifts (docs/results.md).

The paper's thresholds make CAPO reject a few percent of tokens on Qwen2.5-Math-7B (under 8%, Fig. 5); on
another model or learning rate the same numbers can reject most tokens (docs/results.md). From runs with a
measuring selector (``enforce: false``): delta_F = the median over their first ``--steps`` steps (then over runs)
of the per-step 95th percentile of token m_F, and tau_H the same for m_H. A run whose measuring selector advances
its shadow Adam (``advance_when_monitoring``) logs Adam-direction shifts, the kind an enforcing CAPO judges, from
its second step on: its first step (the raw-gradient direction of an empty shadow state) is left out. The study
calibrates on its conservative GRPO arm, so CAPO in the aggressive regime keeps a token only if its predicted shift
stays within what the stable regime's 95th-percentile token produced (the paper's yardstick: Fig. 3's dashed
"GRPO (max)" line). For thresholds measured on the run itself, see ``CAPOSelector(calibration_steps=...)``.
    .venv/bin/python scripts/calibrate_capo.py docs/study/warm/conservative_grpo_s0 [more runs] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics

from capo_lightning import keys
from capo_lightning.report.runs import load_run


def calibrate(run_dirs: list[str] | str, steps: int = 5) -> dict[str, float]:
    """{"delta_f": ..., "tau_h": ...}: per run, the median of its first ``steps`` usable training rows' 95th
    percentiles; then the median over runs."""
    per_run: dict[str, list[float]] = {"delta_f": [], "tau_h": []}
    for run_dir in [run_dirs] if isinstance(run_dirs, str) else run_dirs:
        run = load_run(run_dir)
        if run.enforces:
            raise ValueError(f"{run_dir}: its selector masks tokens; calibrate from a measuring run (enforce: false)")
        skip = 1 if run.advance_when_monitoring else 0
        for name, key in (("delta_f", keys.TOKEN_FISHER_P95), ("tau_h", keys.TOKEN_HESSIAN_P95)):
            _, values = run.series(key)
            if len(values) <= skip:
                raise ValueError(f"{run_dir} logged no {key}: run it with CurvatureMonitor and a measuring selector")
            per_run[name].append(float(statistics.median(values[skip : skip + steps])))
    return {name: float(statistics.median(values)) for name, values in per_run.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    for name, value in calibrate(args.run_dirs, args.steps).items():
        print(f"{name}: {value:.3g}")
