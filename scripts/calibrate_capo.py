"""CAPO thresholds for a model from a measuring run's own token shifts (docs/results.md).

The paper's thresholds make CAPO reject a few percent of tokens on Qwen2.5-Math-7B (under 8%, Fig. 5); on
another model or learning rate the same numbers can reject most tokens (docs/results.md, diagnosis). From a
run with a measuring selector (``enforce: false``): delta_F = the median over its first ``--steps`` steps of
the per-step 95th percentile of token m_F, and tau_H the same for m_H. The study calibrates on its
conservative GRPO arm, so CAPO in the aggressive regime keeps a token only if its predicted shift stays
within what the stable regime's 95th-percentile token produced (the paper's yardstick: Fig. 3's dashed
"GRPO (max)" line); on a run of the target regime itself it gives a ~5% rejection operating point instead.
    .venv/bin/python scripts/calibrate_capo.py docs/study/regimes/conservative_grpo_s0 [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics

from capo_lightning.report.runs import load_run


def calibrate(run_dir: str, steps: int = 5) -> dict[str, float]:
    """{"delta_f": ..., "tau_h": ...} from the run's first ``steps`` training rows."""
    run = load_run(run_dir)
    if run.enforces:
        raise ValueError(f"{run_dir}: its selector masks tokens; calibrate from a measuring run (enforce: false)")
    out = {}
    for name, key in (("delta_f", "curvature/token_fisher_p95"), ("tau_h", "curvature/token_hessian_p95")):
        _, values = run.series(key)
        if len(values) == 0:
            raise ValueError(f"{run_dir} logged no {key}: run it with CurvatureMonitor and a measuring CAPOSelector")
        out[name] = float(statistics.median(values[:steps]))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    for name, value in calibrate(args.run_dir, args.steps).items():
        print(f"{name}: {value:.3g}")
