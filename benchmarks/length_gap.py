r"""Why were capo's completions longer than TRL's in ``vs_trl.py``? The sampling side of the question, measured.

Run from the repository root, offline (not a timing benchmark: any load is fine)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/length_gap.py               # ~10 min on 2 cores
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/length_gap.py --seeds 8

Same model (the bundled SmolLM2-135M-Instruct, untrained), same prompts (``vs_trl.py``'s first ``--steps`` steps:
4 questions each, in its chat template), same settings (8 samples per prompt, at most 64 new tokens, temperature 1,
top-k 50, top-p 1), ``--seeds`` sampling seeds per step. Three samplers:

``TRL``
    ``model.generate(generation_config=GenerationConfig(...))`` with the fields TRL 1.16's ``GRPOTrainer`` sets when
    it generates with transformers (``trl/trainer/grpo_trainer.py``: ``max_new_tokens, do_sample=True,
    pad_token_id, bos_token_id, eos_token_id`` (the model's and the tokenizer's EOS), ``temperature, top_p, top_k,
    min_p=None, repetition_penalty=1.0, cache_implementation=None, disable_compile=True``), on the prompts
    left-padded as TRL pads them, the global RNG seeded as capo seeds its engine.
``capo generate``
    ``HFEngine(loop="generate")``, the engine ``vs_trl.py`` measured.
``capo compact``
    ``HFEngine(loop="compact")``, the default since the compact loop.

Checks: (1) TRL vs capo generate, same seed: are the tokens identical (then the two sample from one distribution and
the settings are equivalent)? (2) compact vs generate: different random streams, so the length distributions are
compared: mean length with its standard error over prompts' groups, the truncated share, and the mean raw logprob of
the sampled tokens (a sampler drawing from another distribution shifts it). The trained runs' lengths per step and
seed come from ``vs_trl.py --seed S`` (its ``completion tokens, every step`` line), not from here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `capo_lightning`

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from capo_lightning.data.order import PromptOrder  # noqa: E402
from capo_lightning.data.prompts import ArithmeticSource  # noqa: E402
from capo_lightning.data.templates import get_template  # noqa: E402
from capo_lightning.models.policy import PolicySpec, load_policy  # noqa: E402
from capo_lightning.rollout import HFEngine, SamplingConfig  # noqa: E402

SAMPLES, NEW_TOKENS, PROMPTS = 8, 64, 4


def trl_generate(model, tokenizer, engine: HFEngine, prompts: list[str], seed: int) -> list[tuple[list[int], list]]:
    """TRL 1.16's transformers generation path, reproduced: (tokens up to the first EOS, no logprobs) per row."""
    eos = engine._eos_ids()
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, temperature=1.0, top_p=1.0, top_k=50, min_p=None,
        repetition_penalty=1.0, cache_implementation=None, disable_compile=True,
    )  # fmt: skip
    rows = [p for p in prompts for _ in range(SAMPLES)]
    enc = tokenizer(rows, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
    got = []
    for row in out:
        ended = torch.isin(row, torch.tensor(eos)).nonzero()
        got.append((row[: int(ended[0]) + 1 if len(ended) else NEW_TOKENS].tolist(), []))
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="vs_trl.py's steps whose prompts are used")
    p.add_argument("--seeds", type=int, default=4, help="sampling seeds per step")
    args = p.parse_args()
    model, tokenizer = load_policy(PolicySpec("bundled:smollm2-135m-instruct"))
    model.eval()
    source = ArithmeticSource(seed=0, min_value=10, max_value=99, ops=["+"])
    order = PromptOrder(source, 0, PROMPTS, max_sampling_rounds=1)
    template = get_template("chat")
    engines = {"capo generate": HFEngine(loop="generate"), "capo compact": HFEngine(loop="compact")}
    for engine in engines.values():
        engine.bind(model, tokenizer)
    got: dict[str, list] = {"TRL": [], **{name: [] for name in engines}}
    identical = total = 0
    for step in range(args.steps):
        prompts = [template.format(order.train_item(step, j, 0, 1).prompt, tokenizer) for j in range(PROMPTS)]
        for seed in range(args.seeds):
            s = 1000 * seed + step
            sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, top_p=1.0, seed=s)
            trl = trl_generate(model, tokenizer, engines["capo generate"], prompts, s)
            got["TRL"].append(trl)
            for name, engine in engines.items():
                got[name].append([(c.token_ids, c.logprobs) for c in engine.generate(prompts, SAMPLES, sampling)])
            identical += sum(a[0] == b[0] for a, b in zip(trl, got["capo generate"][-1], strict=True))
            total += len(trl)
            print(f"step {step} seed {seed}: mean length " + ", ".join(
                f"{name} {statistics.mean(len(t) for t, _ in runs[-1]):.1f}" for name, runs in got.items()
            ), flush=True)  # fmt: skip
    print(f"\n(1) TRL's generation path vs capo's HFEngine(loop='generate'), same seeds: {identical}/{total} "
          f"completions token-for-token identical")  # fmt: skip
    print(f"(2) {args.steps} steps x {args.seeds} seeds x {PROMPTS} prompts x {SAMPLES} samples per sampler; SE over "
          f"the {args.steps * args.seeds * PROMPTS} groups' mean lengths")  # fmt: skip
    print(f"  {'sampler':14s} {'mean len':>8s} {'SE':>5s} {'truncated':>9s} {'raw logprob/token':>17s}")
    for name, runs in got.items():
        rows = [c for batch in runs for c in batch]
        groups = [statistics.mean(len(t) for t, _ in rows[i : i + SAMPLES]) for i in range(0, len(rows), SAMPLES)]
        se = statistics.stdev(groups) / len(groups) ** 0.5
        truncated = sum(len(t) == NEW_TOKENS for t, _ in rows) / len(rows)
        lps = [lp for _, lp in rows for lp in lp]
        lp = f"{statistics.mean(lps):17.3f}" if lps else f"{'-':>17s}"
        print(f"  {name:14s} {statistics.mean(groups):8.1f} {se:5.1f} {100 * truncated:8.0f}% {lp}")


if __name__ == "__main__":
    main()
