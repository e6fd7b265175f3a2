r"""capo vs TRL: seconds per GRPO step, completion tokens per second and peak RSS, same model, prompts and shapes.

Run from the repository root, on CPU, offline. ``bash scripts/install.sh test`` builds ``.venv`` (capo) and
``bash scripts/install_trl.sh`` builds ``.venv-trl`` (TRL 1.16.0, same torch and transformers); then::

    .venv/bin/python benchmarks/vs_trl.py                      # 4 steps each, capo then TRL (minutes: see below)
    .venv/bin/python benchmarks/vs_trl.py --steps 6 --json runs/vs_trl.json
    .venv/bin/python benchmarks/vs_trl.py --capo-engine vllm   # capo rolls out with vLLM (needs .venv-vllm)

The script itself needs only the standard library: it starts one child process per side, one after the
other (``--trl-first`` swaps the order), and sets ``HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1`` in both.

What runs. Model: the bundled SmolLM2-135M-Instruct, the fp32 ``save_pretrained`` folder capo converts
once (``resolve_model_dir("bundled:smollm2-135m-instruct")``), loaded by both sides from that folder
(weights and tokenizer), fp32, sdpa attention. Prompts: capo's quickstart task,
``ArithmeticSource(min_value=10, max_value=99, ops=["+"])``, in capo's training order (step k takes items
4k .. 4k+3), the question as the user turn of the tokenizer's chat template (TRL gets the same questions as
conversational prompts; the TRL child checks that its prompt token ids equal capo's and prints the result).
Shape: ``--prompts`` x ``--samples`` = 4 x 8 = 32 completions per optimizer step, at most ``--new-tokens``
(64) new tokens, temperature 1, top-k 50, top-p 1, AdamW lr ``--lr`` (1e-5) at a constant rate, weight
decay 0, gradient clipping at 1.0, GRPO without KL (no reference model), one optimizer step per rollout,
no validation, no checkpoints. Reward: capo's own grader (``capo_lightning.rewards.math_reward``) on both
sides; the TRL child falls back to an exact last-number match if it cannot import it, and says so.

``capo``
    ``python -m capo_lightning fit --config benchmarks/vs_trl_capo.yaml`` (plus
    ``conf/engine/vllm_cpu.yaml`` with ``--capo-engine vllm``) in ``--capo-python`` (default ``.venv``, or
    ``.venv-vllm`` for vLLM), the shape passed as command-line overrides.
``TRL``
    ``trl.GRPOTrainer`` in ``--trl-python`` (default ``.venv-trl``) with ``GRPOConfig(per_device_train_batch_size
    =32, num_generations=8, max_completion_length=64, loss_type="grpo", scale_rewards="group", beta=0,
    num_iterations=1, use_vllm=False, gradient_checkpointing=False, optim="adamw_torch", use_cpu=True, bf16=False,
    shuffle_dataset=False, lr_scheduler_type="constant", ...)``: ``loss_type="grpo"`` is capo GRPO's
    aggregation (per-sequence token mean, then the mean over sequences) and TRL's default of gradient
    checkpointing is turned off because capo's run does not checkpoint (``--trl-gradient-checkpointing``
    turns it back on).

Method. A step's time is the wall time between the ends of two consecutive optimizer steps: rollout
(generation + reward), forward, backward, clip, optimizer step and the trainer's logging, everything the
loop does. capo logs it as ``time/step_s`` (its CSV log; validation would be excluded, there is none);
TRL's is timed by a ``TrainerCallback`` at ``on_step_end``. So the first step has no time and is the
warm-up: ``--steps N`` (default 4) gives N - 1 timed steps per side. Seconds per step is their mean;
completion tokens per second is the timed steps' completion tokens (EOS included: capo's
``rollout/response_length_mean`` x 32, TRL's generated ids up to the first EOS) over their seconds.
Generation seconds per step is printed too (capo's ``time/generate_s``; TRL's ``_generate_single_turn``,
timed by wrapping it). The two sides sample with different random streams, so their completions and
lengths differ; tokens per second is the length-fair figure. Peak RSS is each child's maximum resident set
size (``os.wait4``'s ``ru_maxrss``: the largest single process of that child's tree), which covers start-up,
model loading and every step. Whole-run wall time (process start to exit) is printed for context, not
compared. Nothing is asserted: the script measures and prints.

Output: a table (both sides and capo/TRL), the per-step times, and the lines ``RATIO capo/TRL seconds per
step = ...``, ``RATIO capo/TRL completion tokens per second = ...``, ``RATIO capo/TRL peak RSS = ...``;
``--json PATH`` writes every number. Children's logs stay in ``--workdir`` (default: a new temporary
folder, printed). Duration: each side loads for about half a minute, then runs its steps (on 2 cores a
capo step took ~27 s and TRL's warm-up step ~53 s in the smoke test), so the default 4 steps take several
minutes. Other jobs on the machine slow generation most of all (each side prints the load average before
and after it): run it on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
CAPO_CONFIG = ROOT / "benchmarks" / "vs_trl_capo.yaml"
VLLM_CONFIG = ROOT / "conf" / "engine" / "vllm_cpu.yaml"
HF_CONFIG = ROOT / "conf" / "engine" / "hf.yaml"
BUNDLED = "bundled:smollm2-135m-instruct"
SOURCE = {"min_value": 10, "max_value": 99, "ops": ["+"]}  # as in vs_trl_capo.yaml's data.train_source
SEED = 0


# ---- the parent: start the children, gather, print ----------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Parse options; run the role asked for (the parent by default)."""
    args = parse_args(argv)
    if args.role == "prompts":
        write_prompts(args)
    elif args.role == "trl":
        run_trl(Path(args.spec))
    else:
        run_benchmark(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``--role``, ``--out`` and ``--spec`` are the children's, hidden from ``--help``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per side; the first is warm-up, not timed")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per completion")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--capo-engine", choices=("hf", "vllm"), default="hf", help="capo's rollout engine")
    p.add_argument("--capo-loop", choices=("compact", "generate"), default="compact", help="HFEngine's loop")
    p.add_argument("--seed", type=int, default=SEED, help="the prompts' stream and order, and both sides' seeds")
    p.add_argument("--capo-python", help="default .venv/bin/python (.venv-vllm/bin/python with --capo-engine vllm)")
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    p.add_argument("--trl-first", action="store_true", help="run TRL before capo")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default (capo: off)")
    p.add_argument("--workdir", help="where the children's logs and outputs go (default: a new temp folder)")
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--role", choices=("bench", "prompts", "trl"), default="bench", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "bench" and args.steps < 2:
        p.error("--steps must be >= 2: the first step is warm-up and has no time")
    if args.capo_python is None:
        args.capo_python = str(ROOT / (".venv-vllm" if args.capo_engine == "vllm" else ".venv") / "bin" / "python")
    return args


def run_benchmark(args: argparse.Namespace) -> None:
    """Prompts first (capo's environment), then both sides one after the other; print and save."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"vs_trl: {args.steps} steps per side ({args.steps - 1} timed), {args.prompts} x {args.samples} x "
          f"<= {args.new_tokens} tokens, capo engine {args.capo_engine}, {os.cpu_count()} CPUs; logs in {work}",
          flush=True)  # fmt: skip
    prompts = make_prompts(args, work)
    sides = {"capo": lambda: run_capo(args, work), "TRL": lambda: run_trl_side(args, work, prompts)}
    order = ["TRL", "capo"] if args.trl_first else ["capo", "TRL"]
    results = {name: sides[name]() for name in order}
    report(results, prompts, args)


def make_prompts(args: argparse.Namespace, work: Path) -> dict:
    """The model folder and the questions of every step, in capo's order, from capo's own code."""
    out = work / "prompts.json"
    cmd = [args.capo_python, str(SCRIPT), "--role", "prompts", "--out", str(out)]
    cmd += ["--steps", str(args.steps), "--prompts", str(args.prompts), "--seed", str(args.seed)]
    child(cmd, work / "prompts.log", "prompts")
    return json.loads(out.read_text())


def run_capo(args: argparse.Namespace, work: Path) -> dict:
    """capo's run through its own CLI; step times and lengths from its CSV log."""
    root = work / "capo"
    cmd = [args.capo_python, "-m", "capo_lightning", "fit", "--config", str(CAPO_CONFIG)]
    if args.capo_engine == "vllm":
        cmd += ["--config", str(VLLM_CONFIG)]
    else:
        cmd += ["--config", str(HF_CONFIG), "--model.engine.init_args.loop", args.capo_loop]
    cmd += ["--seed_everything", str(args.seed)]
    cmd += [
        "--trainer.max_steps", str(args.steps), "--trainer.default_root_dir", str(root),
        "--data.prompts_per_step", str(args.prompts), "--data.group_size", str(args.samples),
        "--data.sampling.max_new_tokens", str(args.new_tokens), "--model.optimizer.init_args.lr", str(args.lr),
    ]  # fmt: skip
    run = child(cmd, work / "capo.log", "capo")
    rows = capo_rows(root)
    check_steps("capo", rows, args.steps)
    completions = args.prompts * args.samples
    return run | {
        "step_s": [float(r["time/step_s"]) for r in rows[1:]],
        "generate_s": [float(r["time/generate_s"]) for r in rows[1:]],
        "tokens": [float(r["rollout/response_length_mean"]) * completions for r in rows[1:]],
        "reward": [float(r["train/reward_mean"]) for r in rows[1:]],
        "tokens_all": [float(r["rollout/response_length_mean"]) * completions for r in rows],
    }


def capo_rows(root: Path) -> list[dict[str, str]]:
    """The training rows of capo's metrics.csv, one per optimizer step, in order."""
    path = next(root.glob("logs/version_*/metrics.csv"))
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("rollout/response_length_mean")]
    return sorted(rows, key=lambda r: float(r["step"]))


def run_trl_side(args: argparse.Namespace, work: Path, prompts: dict) -> dict:
    """TRL's run in its own environment; it writes its numbers to a JSON file."""
    spec = work / "trl_spec.json"
    out = work / "trl_result.json"
    spec.write_text(json.dumps(prompts | {
        "steps": args.steps, "prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens,
        "lr": args.lr, "gradient_checkpointing": args.trl_gradient_checkpointing, "seed": args.seed,
        "output_dir": str(work / "trl"), "out": str(out),
    }))  # fmt: skip
    run = child([args.trl_python, str(SCRIPT), "--role", "trl", "--spec", str(spec)], work / "trl.log", "TRL")
    result = run | json.loads(out.read_text())
    check_steps("TRL", result["step_s"], args.steps)
    return result


def check_steps(name: str, got: list, steps: int) -> None:
    """Stop unless a side reported the numbers of every step (capo: all rows; TRL: the timed ones)."""
    want = steps if name == "capo" else steps - 1
    if len(got) != want:
        raise SystemExit(f"vs_trl: {name} reported {len(got)} steps, expected {want}; see its log")


def child(cmd: list[str], log: Path, name: str) -> dict:
    """Run ``cmd`` to its end, output to ``log``; its wall time and peak RSS (os.wait4's ru_maxrss)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    print(f"vs_trl: {name} running ({log})", flush=True)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # instead of proc.wait(): the child's own rusage
    wall = time.perf_counter() - start
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"vs_trl: {name} failed with exit code {code}; last lines of {log}:\n{tail}")
    load = (load_before, os.getloadavg()[0])  # 1-minute; the child adds ~its threads, more means other jobs
    print(f"vs_trl: {name} done in {wall:.0f} s (load average {load[0]:.2f} -> {load[1]:.2f})", flush=True)
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20, "load_average": load}  # ru_maxrss: KiB


# ---- the report ---------------------------------------------------------------------------------
def summarize(side: dict) -> dict:
    """Seconds per step, generation seconds per step, tokens per step and per second of the timed steps."""
    seconds, tokens = sum(side["step_s"]), sum(side["tokens"])
    return {
        "s_per_step": statistics.mean(side["step_s"]),
        "generate_s_per_step": statistics.mean(side["generate_s"]),
        "tokens_per_step": statistics.mean(side["tokens"]),
        "tokens_per_s": tokens / seconds,
        "peak_rss_gib": side["peak_rss_gib"],
        "wall_s": side["wall_s"],
        "reward_mean": statistics.mean(side["reward"]),
    }


ROWS = (  # key, label, format, compared (capo/TRL printed)
    ("s_per_step", "seconds per step", ".1f", True),
    ("generate_s_per_step", "  of which generation", ".1f", True),
    ("tokens_per_step", "completion tokens per step", ".0f", True),
    ("tokens_per_s", "completion tokens per second", ".1f", True),
    ("peak_rss_gib", "peak RSS (GiB)", ".2f", True),
    ("wall_s", "whole run, wall s (start-up incl.)", ".0f", False),
    ("reward_mean", "reward mean (sanity)", ".3f", False),
)


def report(results: dict, prompts: dict, args: argparse.Namespace) -> None:
    """Print the table, the per-step times and the RATIO lines; write --json."""
    summary = {name: summarize(side) for name, side in results.items()}
    capo, trl = summary["capo"], summary["TRL"]
    loop = f", loop {args.capo_loop}" if args.capo_engine == "hf" else ""
    print(f"\ncapo: {prompts['versions']}, engine {args.capo_engine}{loop}, seed {args.seed}")
    print(f"TRL:  {results['TRL']['versions']}, reward {results['TRL']['reward_fn']}, prompt token ids equal "
          f"to capo's: {results['TRL']['prompt_ids_equal']}")  # fmt: skip
    print(f"\n{'':36} {'capo':>9} {'TRL':>9} {'capo/TRL':>9}")
    for key, label, fmt, compared in ROWS:
        ratio = f"{capo[key] / trl[key]:9.2f}" if compared and trl[key] else ""
        print(f"{label:36} {capo[key]:9{fmt}} {trl[key]:9{fmt}} {ratio}")
    for name, side in results.items():
        print(f"{name} step s (timed steps): {' '.join(f'{s:.1f}' for s in side['step_s'])}")
        print(f"{name} completion tokens, every step: {' '.join(f'{t:.0f}' for t in side['tokens_all'])}")
    print(f"\nRATIO capo/TRL seconds per step = {capo['s_per_step'] / trl['s_per_step']:.3f}")
    print(f"RATIO capo/TRL completion tokens per second = {capo['tokens_per_s'] / trl['tokens_per_s']:.3f}")
    print(f"RATIO capo/TRL peak RSS = {capo['peak_rss_gib'] / trl['peak_rss_gib']:.3f}")
    if args.json:
        out = {"args": vars(args), "summary": summary, "runs": results, "capo_versions": prompts["versions"]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


# ---- child: the prompts, with capo's code (capo's environment) ----------------------------------
def write_prompts(args: argparse.Namespace) -> None:
    """Model folder, questions, answers and capo's prompt token ids of every step, to ``--out``."""
    import torch
    import transformers

    from capo_lightning.data.order import PromptOrder
    from capo_lightning.data.prompts import ArithmeticSource
    from capo_lightning.data.templates import get_template
    from capo_lightning.models.policy import PolicySpec, load_tokenizer, resolve_model_dir

    spec = PolicySpec(BUNDLED)
    order = PromptOrder(ArithmeticSource(seed=args.seed, **SOURCE), args.seed, args.prompts, max_sampling_rounds=1)
    items = [order.train_item(step, j, 0, 1) for step in range(args.steps) for j in range(args.prompts)]
    tokenizer = load_tokenizer(spec)
    texts = [get_template("chat").format(item.prompt, tokenizer) for item in items]
    Path(args.out).write_text(json.dumps({
        "model_dir": resolve_model_dir(spec),
        "questions": [item.prompt for item in items],
        "answers": [item.answer for item in items],
        "prompt_ids": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts],
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }))  # fmt: skip


# ---- child: TRL's run (TRL's environment) -------------------------------------------------------
def run_trl(spec_path: Path) -> None:
    """GRPOTrainer on the spec's prompts; step times, generation times and token counts to spec["out"]."""
    import torch
    import transformers
    import trl
    from datasets import Dataset

    spec = json.loads(spec_path.read_text())
    reward_fn, reward_name = trl_reward()
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": q}] for q in spec["questions"]], "answer": spec["answers"],
    })  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=spec["model_dir"], reward_funcs=reward_fn, args=trl_config(spec), train_dataset=dataset
    )
    clock = StepClock(trainer)
    trainer.add_callback(clock)
    ids_equal = trainer._tokenize_prompts(list(dataset["prompt"]))[0] == spec["prompt_ids"]
    trainer.train()
    Path(spec["out"]).write_text(json.dumps({
        "step_s": clock.step_s(), "generate_s": clock.generate_s[1:], "tokens": clock.tokens[1:],
        "reward": clock.rewards[1:], "reward_fn": reward_name, "prompt_ids_equal": ids_equal,
        "tokens_all": clock.tokens,
        "versions": f"trl {trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
    }))  # fmt: skip


def trl_config(spec: dict):
    """GRPOConfig at capo's shape and settings (see the module docstring)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=spec["output_dir"], use_cpu=True, bf16=False, fp16=False, seed=spec["seed"],
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        per_device_train_batch_size=spec["prompts"] * spec["samples"], num_generations=spec["samples"],
        gradient_accumulation_steps=1, num_iterations=1, max_steps=spec["steps"], shuffle_dataset=False,
        max_completion_length=spec["new_tokens"], temperature=1.0, top_k=50, top_p=1.0, use_vllm=False,
        loss_type="grpo", scale_rewards="group", beta=0.0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=spec["gradient_checkpointing"],
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip


def trl_reward():
    """capo's math_reward as a TRL reward function, else an exact last-number match; and its name."""
    try:
        from capo_lightning.rewards.math import math_reward
    except ImportError:
        math_reward, name = None, "exact last-number match (capo_lightning.rewards not importable)"
    else:
        name = "capo_lightning.rewards.math_reward"

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        if math_reward is not None:
            return math_reward(texts, answer)
        return [float(last_number(t) == a) for t, a in zip(texts, answer)]

    return reward, name


def last_number(text: str) -> str | None:
    """The last integer in ``text`` (the fallback grader's answer)."""
    import re

    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return numbers[-1] if numbers else None


class StepClock:
    """A TrainerCallback (duck-typed) that stamps step ends, and a wrapper that times TRL's generation."""

    def __init__(self, trainer) -> None:
        self.ends: list[float] = []
        self.generate_s: list[float] = []
        self.tokens: list[int] = []
        self.rewards: list[float] = []
        self._generate = trainer._generate_single_turn
        trainer._generate_single_turn = self._timed_generate

    def _timed_generate(self, *args, **kwargs):
        start = time.perf_counter()
        completion_ids, logprobs = self._generate(*args, **kwargs)
        self.generate_s.append(time.perf_counter() - start)
        self.tokens.append(sum(len(ids) for ids in completion_ids))  # each up to and including its first EOS
        return completion_ids, logprobs

    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.rewards.append(float(logs["reward"]))

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None  # the other TrainerCallback events
        raise AttributeError(name)


if __name__ == "__main__":
    main()
