"""Record the metrics of reference runs before a refactor of the training step, and compare after it.

    .venv/bin/python scripts/behaviour_anchor.py record DIR [--quickstart]   # runs every case, keeps each metrics.csv
    .venv/bin/python scripts/behaviour_anchor.py compare DIR_BEFORE DIR_AFTER

The cases are real ``capo fit`` runs of the tiny model (seconds each) that between them take every schedule of a
step: streaming CAPO over micro-batches, the multi-pass step (``ppo_epochs`` 2, 2 minibatches), DAPO with
dynamic sampling (and CAPO, streaming), and a 2-process DDP run (CAPO, micro-batches); ``--quickstart`` adds
the quickstart itself (minutes). ``compare`` checks every logged key except timings (``time/*``, throughput),
per step: equal bitwise, except keys whose statistic may now be pooled across ranks (``--pooled`` prefixes,
default ``select/``, ``curvature/``), which may move by rounding (relative 1e-6). Exit status 1 on any difference,
with each listed.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capo_lightning import keys  # noqa: E402

TINY = "--config conf/debug/tiny_cpu.yaml --trainer.max_steps 3 --trainer.limit_val_batches 0"
# the tiny model never answers right: a reward that varies with length (DAPO's soft overlong penalty over the whole
# budget) gives every group advantages, so selection, normalisers and clipping all act
VARIED = (
    "--data.reward_fn.class_path capo_lightning.rewards.shaping.OverlongPenalty "
    "--data.reward_fn.init_args.reward_fn capo_lightning.rewards.math.math_reward "
    "--data.reward_fn.init_args.cache_fraction 1.0"
)
CAPO = "--config conf/selector/capo.yaml --model.selector.init_args.delta_f 3e-4"
CASES: dict[str, list[str]] = {
    name: shlex.split(args)
    for name, args in {
        "capo_stream": f"{TINY} {VARIED} {CAPO} --data.prompts_per_step 4 --model.micro_batch_size 5",
        "multi_pass": f"{TINY} {VARIED} {CAPO} --data.prompts_per_step 4 --model.ppo_epochs 2 --model.minibatches 2 "
        "--model.micro_batch_size 3 --trainer.max_steps 8",
        "dapo_dynamic": f"{TINY} --config conf/objective/dapo.yaml {CAPO} --data.prompts_per_step 4 "
        "--data.reward_fn.init_args.cache_fraction 1.0 --model.micro_batch_size 4",
        "ddp2": f"{TINY} {VARIED} {CAPO} --data.prompts_per_step 2 --model.micro_batch_size 3 --trainer.devices 2 "
        "--trainer.strategy ddp",
    }.items()
}
QUICKSTART = ["--config", "conf/quickstart.yaml"]


def record(out: Path, quickstart: bool) -> None:
    """Run every case into ``out/<case>`` and keep its ``metrics.csv``."""
    cases = dict(CASES, **({"quickstart": QUICKSTART} if quickstart else {}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    for name, args in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            command = [str(ROOT / ".venv/bin/capo"), "fit", *args, "--trainer.default_root_dir", tmp]
            subprocess.run(command, cwd=ROOT, env=env, check=True)
            (out / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(sorted(Path(tmp).rglob("metrics.csv"))[-1], out / name / "metrics.csv")
        print(f"recorded {name}")


def rows(path: Path) -> dict[tuple[float, int], dict[str, float]]:
    """(step, occurrence) -> that row's numeric cells, timing keys left out."""
    out: dict[tuple[float, int], dict[str, float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or "nan")
            key = (step, sum(1 for s, _ in out if s == step))
            kept = {k: v for k, v in row.items() if v not in ("", None) and not keys.measured(k)}
            out[key] = {k: float(v) for k, v in kept.items()}
    return out


def same(a: float, b: float, pooled: bool) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b or (pooled and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12))


def compare(before: Path, after: Path, pooled: tuple[str, ...]) -> list[str]:
    """Every difference between the two recordings' per-step metrics."""
    problems = []
    for case in sorted(p.name for p in before.iterdir() if (p / "metrics.csv").exists()):
        old, new = rows(before / case / "metrics.csv"), rows(after / case / "metrics.csv")
        if set(old) != set(new):
            problems.append(f"{case}: steps differ: {sorted(set(old) ^ set(new))}")
        for key in sorted(set(old) & set(new)):
            a, b = old[key], new[key]
            for metric in sorted(set(a) | set(b)):
                if metric not in a or metric not in b:
                    where = "before" if metric in a else "after"
                    problems.append(f"{case} step {key[0]:g}: {metric} only {where}")
                elif not same(a[metric], b[metric], metric.startswith(pooled)):
                    problems.append(f"{case} step {key[0]:g}: {metric} {a[metric]!r} -> {b[metric]!r}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--quickstart", action="store_true")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    cmp.add_argument("--pooled", nargs="*", default=["select/", "curvature/"])
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.quickstart)
        return
    problems = compare(args.before, args.after, tuple(args.pooled))
    print("\n".join(problems) if problems else "no difference in any non-time metric")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
