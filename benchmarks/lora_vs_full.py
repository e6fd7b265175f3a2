r"""LoRA against full fine-tuning on the quickstart: seconds per step, peak RSS, checkpoint size, reward curve.

Run from the repository root, on CPU, offline, on an idle machine (``bash scripts/install.sh test``)::

    .venv/bin/python benchmarks/lora_vs_full.py                    # 12 steps each, full then LoRA (~10 min)
    .venv/bin/python benchmarks/lora_vs_full.py --steps 4 --json runs/lora_vs_full.json

What runs: ``capo fit --config conf/quickstart.yaml`` (GRPO, SmolLM2-135M-Instruct fp32, 4 prompts x 8
samples, AdamW lr 2e-5) and the same with ``--config conf/policy/lora.yaml`` on top (rank-16 adapters on
every attention and MLP projection, frozen head, AdamW lr 2e-4), each in its own child process, one after
the other. Both roll out with ``HFEngine`` and validate at steps 0, 6 and 12 (with the default 12 steps).

Method: a step's time is capo's ``time/step_s`` (rollout, update and logging; validation excluded) and
``time/train_s`` the update alone (forward, backward, optimizer step); the first step is the warm-up and is
left out of both means. Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (start-up, loading, every
step). Checkpoint size is the largest ``.ckpt`` the run writes (every 6 steps). The reward curve is
``train/reward_mean`` per step and ``val/accuracy`` per validation. Nothing is asserted: the script measures
and prints, ending with ``RATIO lora/full ...`` lines; ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, extra: list[str], steps: int, workdir: Path) -> dict:
    """One quickstart fit in a child process: its metrics, peak RSS and checkpoint size."""
    out = workdir / name
    cmd = [
        sys.executable, "-m", "capo_lightning", "fit", "--config", str(ROOT / "conf/quickstart.yaml"), *extra,
        f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={out}",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    with open(workdir / f"{name}.log", "w") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"[{name}] failed: see {workdir / f'{name}.log'}")
    (metrics,) = out.glob("logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    trained = [r for r in rows if r.get("train/reward_mean")]
    timed = trained[1:] or trained

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in timed if r.get(key)) / max(1, sum(1 for r in timed if r.get(key)))

    return {
        "step_s": mean("time/step_s"),
        "train_s": mean("time/train_s"),
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux
        "checkpoint_mb": max([p.stat().st_size / 1e6 for p in out.glob("checkpoints/*.ckpt")], default=float("nan")),
        "reward": [round(float(r["train/reward_mean"]), 5) for r in trained],
        "val_accuracy": {int(r["step"]): round(float(r["val/accuracy"]), 4) for r in rows if r.get("val/accuracy")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the quickstart's 12)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="capo-lora-vs-full-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {
        "full": run("full", [], args.steps, workdir),
        "lora": run("lora", ["--config", str(ROOT / "conf/policy/lora.yaml")], args.steps, workdir),
    }
    print(f"\n{'':>6} {'s/step':>8} {'train s':>8} {'peak RSS GiB':>13} {'ckpt MB':>9}  held-out accuracy by step")
    for name, r in results.items():
        val = ", ".join(f"{step}: {acc:.3f}" for step, acc in r["val_accuracy"].items())
        sizes = f"{r['step_s']:8.2f} {r['train_s']:8.2f} {r['peak_rss_gib']:13.2f} {r['checkpoint_mb']:9.1f}"
        print(f"{name:>6} {sizes}  {val}")
    for name, r in results.items():
        print(f"{name} train/reward_mean: {', '.join(f'{x:g}' for x in r['reward'])}")
    full, lora = results["full"], results["lora"]
    for label, key in [("seconds per step", "step_s"), ("update seconds", "train_s"), ("peak RSS", "peak_rss_gib"),
                       ("checkpoint size", "checkpoint_mb")]:  # fmt: skip
        print(f"RATIO lora/full {label} = {lora[key] / full[key]:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
