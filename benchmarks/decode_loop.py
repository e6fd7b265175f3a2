r"""HFEngine's compact decoding loop against transformers ``generate``: tokens per second, two shapes, one run.

Run from the repository root, offline, on idle cores (another job on 2 cores slows generation several times)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/decode_loop.py            # ~10 min on 2 cores
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/decode_loop.py --repeats 7 --json out.json

Model: the bundled SmolLM2-135M-Instruct (fp32), loaded once and bound to two ``HFEngine``s that differ only in
``loop``: ``compact`` (capo's loop, which drops a row and its KV cache once it has ended) and ``generate``
(transformers', which computes every row until the longest has ended). Prompts: the quickstart's task
(``ArithmeticSource(10..99, "+")`` in the tokenizer's chat template), 4 prompts x 8 samples per batch, temperature
1, top-k 50. Shapes: ``quickstart`` (at most 48 new tokens, the quickstart's budget) and ``long-tail`` (at most
256: most answers end within ~40 tokens, the few that ramble run to the cap, the case ``generate`` pays most for).

Method: per shape, one untimed warm-up batch per loop, then ``--repeats`` (5) timed batches per loop, alternating
which loop goes first; repeat r uses fresh prompts and seed r for both loops. The loops draw from different random
streams (the same distribution), so their completions differ: completion tokens per second (EOS included, over the
batch's wall time) is the fair figure; each loop's mean length and truncated share are printed to show how far the
batches differ, and "row-steps" counts the forwards' rows (``generate``: rows x its longest answer; compact: the sum
of the lengths). Reported: the median tokens/s of the repeats with the min-max spread, and compact/generate of the
medians.

Roofline: what this machine allows for one decoding step of m rows, from its measured fp32 matmul throughput
(a 1024 x 1024 x 1024 ``torch.mm``) and memory bandwidth (a 256 MiB copy, read + write): a step reads every weight
once (4 bytes x parameters N) and does 2N FLOPs per row (attention over the short cache neglected), so
tokens/s <= min(FLOP/s / (2N), m x bandwidth / (4N)) at m = the batch's rows: compute-bound above
m = 2 x FLOP/s / bandwidth rows. Printed next to the measured rates at the full batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `capo_lightning`

import torch  # noqa: E402

from capo_lightning.data.prompts import ArithmeticSource  # noqa: E402
from capo_lightning.data.templates import get_template  # noqa: E402
from capo_lightning.models.policy import PolicySpec, load_policy  # noqa: E402
from capo_lightning.rollout import HFEngine, SamplingConfig  # noqa: E402

LOOPS = ("compact", "generate")
SHAPES = {"quickstart": 48, "long-tail": 256}


def batch_prompts(tokenizer, source: ArithmeticSource, start: int, count: int) -> list[str]:
    return [get_template("chat").format(source.item(i).prompt, tokenizer) for i in range(start, start + count)]


def timed(engine: HFEngine, prompts: list[str], samples: int, sampling: SamplingConfig) -> dict:
    start = time.perf_counter()
    got = engine.generate(prompts, samples, sampling)
    wall = time.perf_counter() - start
    lengths = [len(c.token_ids) for c in got]
    per_prompt = [lengths[i : i + samples] for i in range(0, len(lengths), samples)]
    return {
        "s": wall, "tokens": sum(lengths), "rate": sum(lengths) / wall,
        "mean_len": statistics.mean(lengths), "truncated": sum(c.finish_reason == "length" for c in got) / len(got),
        "row_steps": sum(lengths) if engine.loop == "compact" else len(lengths) * max(lengths),
        "per_prompt": per_prompt,
    }  # fmt: skip


def roofline(params: int, rows: int) -> dict:
    """Measured matmul FLOP/s and copy bandwidth; the tokens/s bound of one decoding step of ``rows`` rows."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        torch.mm(a, b)
    flops = reps * 2 * 1024**3 / (time.perf_counter() - start)
    src = torch.empty(64 * 2**20)  # 256 MiB fp32
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    bandwidth = 5 * 2 * src.numel() * 4 / (time.perf_counter() - start)
    compute, memory = flops / (2 * params), rows * bandwidth / (4 * params)
    return {"gflops": flops / 1e9, "gbps": bandwidth / 1e9, "bound_tok_s": min(compute, memory),
            "compute_tok_s": compute, "memory_tok_s": memory}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), load {load}")
    policy, tokenizer = load_policy(PolicySpec("bundled:smollm2-135m-instruct"))
    engines = {loop: HFEngine(loop=loop) for loop in LOOPS}
    for engine in engines.values():
        engine.bind(policy, tokenizer)
    source = ArithmeticSource(min_value=10, max_value=99, ops=["+"])
    P, n = args.prompts, args.samples
    results: dict = {"repeats": args.repeats, "shapes": {}}
    for shape, budget in SHAPES.items():
        runs: dict[str, list[dict]] = {loop: [] for loop in LOOPS}
        for r in range(-1, args.repeats):  # r = -1: warm-up, not kept
            prompts = batch_prompts(tokenizer, source, (r + 1) * P, P)
            sampling = SamplingConfig(max_new_tokens=budget, temperature=1.0, top_k=50, top_p=1.0, seed=r)
            for loop in LOOPS if r % 2 == 0 else LOOPS[::-1]:
                got = timed(engines[loop], prompts, n, sampling)
                print(f"{shape:10s} repeat {r:2d} {loop:8s} {got['s']:6.2f} s {got['tokens']:5d} tokens "
                      f"{got['rate']:6.1f} tok/s mean len {got['mean_len']:5.1f}", flush=True)  # fmt: skip
                if r >= 0:
                    runs[loop].append(got)
        results["shapes"][shape] = {"max_new_tokens": budget, "runs": runs}
    params = sum(x.numel() for x in policy.parameters())
    results["roofline"] = roofline(params, P * n)
    report(results, P * n)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(results: dict, rows: int) -> None:
    print(f"\n=== compact loop vs generate: {rows} rows per batch, temperature 1, top-k 50; medians of "
          f"{results['repeats']} timed batches per loop (min-max) ===")  # fmt: skip
    print(f"  {'shape':10s} {'loop':8s} {'tok/s median':>12s} {'(min-max)':>15s} {'s/batch':>8s} "
          f"{'mean len':>8s} {'truncated':>9s} {'row-steps':>9s}")  # fmt: skip
    for shape, got in results["shapes"].items():
        med = {}
        for loop, runs in got["runs"].items():
            rates = [r["rate"] for r in runs]
            med[loop] = statistics.median(rates)
            print(f"  {shape:10s} {loop:8s} {med[loop]:12.1f} {min(rates):7.1f}-{max(rates):<7.1f} "
                  f"{statistics.median(r['s'] for r in runs):8.2f} {statistics.mean(r['mean_len'] for r in runs):8.1f} "
                  f"{100 * statistics.mean(r['truncated'] for r in runs):8.0f}% "
                  f"{statistics.mean(r['row_steps'] for r in runs):9.0f}")  # fmt: skip
        print(f"  RATIO {shape} compact/generate tokens per second (medians) = {med['compact'] / med['generate']:.2f}")
    roof = results["roofline"]
    print(f"\nroofline: matmul {roof['gflops']:.1f} GFLOP/s, copy {roof['gbps']:.1f} GB/s measured; a {rows}-row "
          f"decoding step allows <= {roof['bound_tok_s']:.0f} tok/s (compute {roof['compute_tok_s']:.0f}, "
          f"weights' bandwidth {roof['memory_tok_s']:.0f})")  # fmt: skip
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average now {load} (compare with the CPU count: other jobs skew the ratios)")


if __name__ == "__main__":
    main()
