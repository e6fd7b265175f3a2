"""The warm-started regime study (docs/results.md): one command builds the warm start, one runs every arm.

    .venv/bin/python scripts/warm_study.py warm-start [--results DIR]   # stage 1: ~15 min on 2 cores
    .venv/bin/python scripts/warm_study.py run [--results DIR] [--commit-to REPO] [--only NAME ...] [--priority N]
    .venv/bin/python scripts/warm_study.py list                        # the runs, in order, and which are done

Both refuse a dirty tree (the study must run one code version: pin a clean worktree, e.g.
``git worktree add ../study <commit>`` with its own ``bash scripts/install.sh``), and check that the package the
venv imports is this tree's. ``run`` is resumable: a run whose results hold ``provenance.json`` is skipped, a
stopped one resumes from its last checkpoint. A finished run's logs go to ``<results>/<run>/`` (``metrics.csv`` with
every log version joined, ``config.yaml``, ``completions.jsonl``, ``collapse.jsonl``) with ``provenance.json``:
the commit, the exact command, the starting policy and its checksum, wall time; its checkpoints are deleted
(1.6 GB each). ``--commit-to REPO`` commits each finished run's folder in REPO (only those paths) as it finishes.

Run order (the issue's priorities): (1) conservative GRPO; aggressive GRPO, CAPO at the paper's thresholds, CAPO
calibrated on conservative GRPO's logged shifts, CAPO with automatic calibration; the learning-rate ladder (2x and
3x the conservative rate at the aggressive batch) for GRPO and automatically calibrated CAPO; (2) Dr.GRPO, Dr.CAPO,
REINFORCE, ReinCAPO (presumed); (3) Dr.CAPO with the SGD shadow model, conservative CAPO (automatic), and the
ladder for CAPO at the paper's thresholds. Three seeds each.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from capo_lightning import keys

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
WARM = ROOT / "runs" / "warm_start"
POLICY = WARM / "policy"
# (priority, regime, arm) in run order; seeds vary fastest, so an arm's three seeds finish together
PLAN = [
    (1, "conservative", "grpo"),
    (1, "aggressive", "grpo"),
    (1, "aggressive", "capo"),
    (1, "aggressive", "capo_calibrated"),
    (1, "aggressive", "capo_auto"),
    (1, "aggressive_lr2x", "grpo"),
    (1, "aggressive_lr2x", "capo_auto"),
    (1, "aggressive_lr3x", "grpo"),
    (1, "aggressive_lr3x", "capo_auto"),
    (2, "aggressive", "dr_grpo"),
    (2, "aggressive", "dr_capo"),
    (2, "aggressive", "reinforce"),
    (2, "aggressive", "rein_capo"),
    (3, "aggressive", "dr_capo_sgd"),
    (3, "conservative", "capo_auto"),
    (3, "aggressive_lr2x", "capo"),
    (3, "aggressive_lr3x", "capo"),
]


def runs(priority: int = 3, only: list[str] | None = None) -> list[tuple[str, str, str, int]]:
    """(name, regime, arm, seed) of every run up to ``priority``, in order; ``only`` keeps those names or arms."""
    out = [
        (f"{regime}_{arm}_s{seed}", regime, arm, seed)
        for level, regime, arm in PLAN
        if level <= priority
        for seed in SEEDS
    ]
    if only:
        out = [run for run in out if run[0] in only or f"{run[1]}:{run[2]}" in only]
    return out


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def check_tree() -> str:
    """The commit this tree is at; refuses a tree with changes (tracked or untracked, ignored files aside) and a
    venv whose ``capo_lightning`` is not this tree's."""
    dirty = git("status", "--porcelain")
    if dirty:
        sys.exit(
            f"warm_study: {ROOT} has uncommitted changes; the study runs one code version. Commit or stash them, or "
            f"run from a pinned clean worktree (git worktree add ../study <commit>).\n{dirty}"
        )
    where = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", "import capo_lightning; print(capo_lightning.__file__)"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    if not Path(where).resolve().is_relative_to(ROOT):
        sys.exit(f"warm_study: .venv imports capo_lightning from {where}, not from {ROOT}; run scripts/install.sh here")
    return git("rev-parse", "HEAD")


def folder_checksum(folder: Path) -> str:
    """SHA-256 over every file of ``folder`` (relative path and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def capo(*args: str) -> list[str]:
    return [str(ROOT / ".venv/bin/capo"), *args]


def measure(kind: str, out: Path) -> dict:
    """Accuracy of the warm start on the study's training split at training sampling (``train``: 256 problems x 2
    samples at temperature 1, top-k 50) or on the held-out split at the study's evaluation (``heldout``: 320
    problems, temperature 0.6), with its binomial standard error."""
    base = ["--config", "conf/warm_study/base.yaml", "--model.policy.name_or_path", str(POLICY)]
    base += ["--trainer.default_root_dir", str(out), "--trainer.callbacks=[]", "--seed_everything", "0"]
    if kind == "train":
        base += ["--data.val_source.init_args.split", "[0.5, 0.9]", "--data.val_source.init_args.seed", "777"]
        base += ["--data.val_prompts", "256", "--data.val_samples", "2", "--data.val_sampling.temperature", "1.0"]
        base += ["--data.val_sampling.top_k", "50", "--data.val_sampling.top_p", "1.0"]
        base += ["--data.val_sampling.max_new_tokens", "48"]
    subprocess.run(capo("validate", *base), cwd=ROOT, check=True)
    rows = read_csv(sorted(out.rglob("metrics.csv"))[-1])
    accuracy = next(row[keys.VAL_ACCURACY] for row in rows if keys.VAL_ACCURACY in row)
    samples = 512 if kind == "train" else 320
    return {"accuracy": accuracy, "se": (accuracy * (1 - accuracy) / samples) ** 0.5, "samples": samples}


def read_csv(path: Path) -> list[dict[str, float]]:
    import csv

    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def warm_start(results: Path) -> None:
    """Fit (resumable), export, measure, and write ``<results>/warm_start.json``."""
    commit, start = check_tree(), time.time()
    if not (WARM / "fit.done").exists():
        resume = ["--ckpt_path", "last"] if (WARM / "checkpoints" / "last.ckpt").exists() else []
        subprocess.run(capo("fit", "--config", "conf/warm_study/warm_start.yaml", *resume), cwd=ROOT, check=True)
        (WARM / "fit.done").touch()
    if POLICY.exists():
        shutil.rmtree(POLICY)
    subprocess.run(capo("export", "--ckpt_path", str(WARM / "checkpoints/last.ckpt"), "--out", str(POLICY)), check=True)
    for kind in ("train", "heldout"):
        shutil.rmtree(WARM / f"measure_{kind}", ignore_errors=True)
    record = {
        "config": "conf/warm_study/warm_start.yaml",
        "seed": 0,
        "commit": commit,
        "policy": str(POLICY.relative_to(ROOT)),
        "policy_sha256": folder_checksum(POLICY),
        "train_accuracy": measure("train", WARM / "measure_train"),
        "heldout_accuracy": measure("heldout", WARM / "measure_heldout"),
        "wall_s_measure_and_export": round(time.time() - start),
    }
    fit_rows = read_csv(sorted((WARM / "logs").rglob("metrics.csv"))[-1])
    record["fit_reward_by_step"] = [row[keys.REWARD_MEAN] for row in fit_rows if keys.REWARD_MEAN in row]
    record["fit_heldout_by_step"] = {int(r["step"]): r[keys.VAL_ACCURACY] for r in fit_rows if keys.VAL_ACCURACY in r}
    results.mkdir(parents=True, exist_ok=True)
    (results / "warm_start.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy(sorted((WARM / "logs").rglob("metrics.csv"))[-1], results / "warm_start_metrics.csv")
    print(json.dumps(record, indent=2))


def calibrated_thresholds(results: Path) -> list[str]:
    """``--model.selector.init_args.delta_f/tau_h`` from the committed conservative GRPO runs (all seeds)."""
    spec = importlib.util.spec_from_file_location("calibrate_capo", ROOT / "scripts" / "calibrate_capo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dirs = [results / f"conservative_grpo_s{seed}" for seed in SEEDS]
    if not all((d / "provenance.json").exists() for d in dirs):
        raise FileNotFoundError("the calibrated arm needs the three conservative GRPO runs first")
    found = module.calibrate([str(d) for d in dirs])
    return [f"--model.selector.init_args.{name}={found[name]:.4g}" for name in ("delta_f", "tau_h")]


def run_one(name: str, regime: str, arm: str, seed: int, results: Path, commit: str) -> Path:
    """Fit one run (resuming a stopped one), then keep its logs and provenance in ``results/name``."""
    root = ROOT / "runs" / "warm_study" / name
    command = capo(
        "fit", "--config", "conf/warm_study/base.yaml", "--regime", f"conf/regime/{regime}.yaml",
        "--config", f"conf/warm_study/{arm}.yaml", "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(root.relative_to(ROOT)),
    )  # fmt: skip
    if arm == "capo_calibrated":
        command += calibrated_thresholds(results)
    resumed = (root / "checkpoints" / "last.ckpt").exists()
    start = time.time()
    subprocess.run([*command, *(["--ckpt_path", "last"] if resumed else [])], cwd=ROOT, check=True)
    wall = time.time() - start
    sys.path.insert(0, str(ROOT))
    from capo_lightning.report.runs import load_run
    from capo_lightning.report.versions import write_rows

    out = results / name
    out.mkdir(parents=True, exist_ok=True)
    logs = max(root.glob("logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    shutil.copy(logs / "config.yaml", out / "config.yaml")
    write_rows(load_run(root).rows, out / "metrics.csv")  # every version joined
    for extra in ("completions.jsonl", "collapse.jsonl"):
        if (logs / extra).exists():
            shutil.copy(logs / extra, out / extra)
    previous = json.loads((out / "provenance.json").read_text()) if (out / "provenance.json").exists() else {}
    provenance = {
        "commit": commit,
        "command": shlex.join([Path(command[0]).name, *command[1:]]),
        "resumed": resumed,
        "policy": str(POLICY.relative_to(ROOT)),
        "policy_sha256": folder_checksum(POLICY),
        "wall_s": round(wall + previous.get("wall_s", 0)),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    return out


def commit_results(repo: Path, folder: Path, message: str) -> None:
    """Commit ``folder`` alone in ``repo`` (other staged or changed files there are left as they are)."""
    relative = str(folder.resolve().relative_to(repo.resolve()))
    for attempt in range(5):
        try:
            git("add", "--", relative, cwd=repo)
            git("commit", "--only", "-m", message, "--", relative, cwd=repo)
            return
        except subprocess.CalledProcessError as error:  # an index lock held by another git command: retry
            print(f"warm_study: commit failed ({error.stderr.strip()}); retrying", file=sys.stderr)
            time.sleep(5 * (attempt + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["warm-start", "run", "list"])
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "study" / "warm")
    parser.add_argument("--commit-to", type=Path, default=None, help="a git checkout holding --results")
    parser.add_argument("--priority", type=int, default=3, help="run priorities 1..N (default all)")
    parser.add_argument("--only", nargs="*", default=None, help="run names or regime:arm pairs")
    args = parser.parse_args()
    results = args.results.resolve()
    if args.command == "list":
        for name, *_ in runs(args.priority, args.only):
            print(("done " if (results / name / "provenance.json").exists() else "todo ") + name)
        return
    if args.command == "warm-start":
        warm_start(results)
        if args.commit_to:
            commit_results(args.commit_to, results, "Warm-started study: the warm start's accuracies and checksum")
        return
    commit = check_tree()
    expected = json.loads((results / "warm_start.json").read_text())["policy_sha256"]
    if folder_checksum(POLICY) != expected:
        sys.exit(f"warm_study: {POLICY} does not match the checksum in {results / 'warm_start.json'}; rebuild it")
    for name, regime, arm, seed in runs(args.priority, args.only):
        if (results / name / "provenance.json").exists():
            print(f"skip {name} (done)")
            continue
        if arm == "capo_calibrated" and not all(
            (results / f"conservative_grpo_s{s}" / "provenance.json").exists() for s in SEEDS
        ):
            print(f"skip {name} (needs the conservative GRPO runs first)")
            continue
        out = run_one(name, regime, arm, seed, results, commit)
        print(f"finished {name}")
        if args.commit_to:
            commit_results(args.commit_to, out, f"Warm-started study: {name} finished (metrics, config, provenance)")


if __name__ == "__main__":
    main()
