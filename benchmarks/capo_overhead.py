"""What CAPO token selection costs: training-step ratio CAPO / KeepAll, and the curvature pass alone.

Run from the repository root (CPU, offline)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/capo_overhead.py            # everything
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/capo_overhead.py --smollm2  # one part

Parts (default: all three)

``--tiny`` / ``--smollm2``: step ratio.
    One rollout batch (B=4 prompts x G=8 samples, 48 new tokens, top-50 sampling at temperature 1,
    the quickstart's arithmetic prompts) is generated ONCE with the model's own HFEngine; generation
    is never timed. A fresh CAPOModule (GRPO, AdamW lr 2e-5, grad-clip 1.0, fused single-forward path)
    is built with a CAPOSelector (paper thresholds delta_f=1e-4, tau_h=0.01, symmetric, Adam model,
    top_k=50) and trained by a real ``lightning.Trainer`` on that same batch repeated. A callback swaps
    ``module.selector`` between the CAPOSelector and KeepAll before every batch, so both arms run inside
    the same process, Trainer and weights, interleaved in pairs whose order alternates (CA, AC, CA, ...)
    to cancel drift and the noise of other jobs on the machine. The timed region is the whole
    ``module.training_step`` call (forward with hidden states if the selector needs them, selection,
    loss, backward, clip, AdamW step, metric logging), measured by wrapping the bound method; its
    ``_score`` (forward), ``_select`` and ``_backward_and_step`` parts are timed the same way. The first
    pair is warm-up and dropped (CAPO's first call sees an empty shadow-Adam state and takes the cheaper
    raw-gradient path). Reported: median step time of each arm, the ratio of the medians and the median
    of the per-pair ratios. Swapping is honest for KeepAll: it is exactly what a KeepAll run executes
    (no hidden states requested, all-True mask); the CAPO arm's shadow-Adam state advances only on its
    own steps, as in a CAPO run. The weights move by one small AdamW step per step, which does not
    change the cost. Afterwards the last CAPO TokenView is replayed through a copy of the selector with
    per-phase timers and under ``torch.profiler`` (top ops by self CPU time) to show where the time goes.

``--sweep``: the curvature pass alone.
    ``CAPOSelector.forward`` on a synthetic TokenView (random W ~ N(0, 0.02^2) [V, d], hidden ~ N(0, 1)
    [T, d], d=576, k=50, actions drawn from each token's top 5, +/-1 advantages, every token valid) for
    V in {1k, 32k, 152k} at T=1024 and T in {256, 1k, 4k} at V=32k. The shadow-Adam state is pre-filled
    (step 10, non-zero m and v), i.e. the steady state. Each configuration runs in two fresh
    subprocesses: one for time (one warm-up call, then the median of ``--sweep-repeats`` calls, with
    ``curvature.topk_policy`` alone timed alongside) and one for memory. Memory: torch's CPU allocations
    are invisible to tracemalloc, so the memory worker resets the kernel's resident-set high-water mark
    (``echo 5 > /proc/self/clear_refs``) right before ONE steady-state forward and reports VmHWM minus
    the VmRSS just before the call: the transient peak of the pass on top of inputs and state. That
    worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS instead of
    staying in glibc's heap (otherwise RSS would under-report re-used memory). The persistent state
    (2 x V x d fp32 for Adam's m and v) is reported separately.

Timings are wall-clock on whatever CPU runs this; other processes add noise, which is why arms are
interleaved and medians reported. Total default runtime is ~6-9 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `capo_lightning`

import torch  # noqa: E402

from capo_lightning.selection import curvature as C  # noqa: E402
from capo_lightning.selection.base import TokenView  # noqa: E402
from capo_lightning.selection.capo import CAPOSelector  # noqa: E402

PAPER = dict(delta_f=1e-4, tau_h=0.01, symmetric=True, top_k=50, optimizer_model="adam", enforce=True)
LR = 2e-5  # the quickstart's learning rate


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _mib(n_bytes: float) -> float:
    return n_bytes / 2**20


# ================================================================================================
# Part 1: step ratio on a real Trainer
# ================================================================================================
class _FixedBatches:
    """A sized iterable over ready-made batches (as tests/helpers.FixedBatches)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _length_reward(completions: list[str], answers: list[str], **_: object) -> list[float]:
    """Reward with within-group variance even for a random model (used for the tiny model only)."""
    return [len(c) / 10.0 for c in completions]


def make_batch(model: str, prompts: int, samples: int, new_tokens: int, seed: int = 0):
    """Generate one rollout batch with the model's own engine (not timed by the benchmark)."""
    from capo_lightning.data.datamodule import RolloutDataModule
    from capo_lightning.data.prompts import ArithmeticSource
    from capo_lightning.module import CAPOModule
    from capo_lightning.policy import PolicySpec
    from capo_lightning.rewards.math import math_reward
    from capo_lightning.rollout import SamplingConfig

    gen = CAPOModule(policy=PolicySpec(model))
    gen.configure_model()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, top_k=50)
    dm = RolloutDataModule(
        train_source=ArithmeticSource(seed=0, min_value=10, max_value=99, ops=["+"]),
        prompts_per_step=prompts,
        group_size=samples,
        sampling=sampling,
        reward_fn=_length_reward if model.startswith("tiny") else math_reward,
        max_prompt_tokens=128,
    )
    dm.connect(gen.engine, gen.tokenizer, lambda: (0, 0))
    t0 = time.perf_counter()
    batch = dm.rollout([dm.train_source.item(i) for i in range(prompts)], samples, replace(sampling, seed=seed), 0, 0)
    gen_s = time.perf_counter() - t0
    del gen
    gc.collect()
    return batch, gen_s


class _Alternate:
    """Lightning callback (built lazily so importing this file does not need lightning) that sets
    ``module.selector`` from a schedule before each batch."""

    @staticmethod
    def make(schedule: list[str], selectors: dict):
        import lightning as L

        class Alternate(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                pl_module.selector = selectors[schedule[batch_idx]]

        return Alternate()


def _timed(record: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[key].append(time.perf_counter() - t0)

    return wrapper


def bench_step(model: str, pairs: int, prompts: int, samples: int, new_tokens: int, profile: bool) -> dict:
    """Interleaved CAPO / KeepAll training steps on one fixed batch; returns the summary."""
    import lightning as L

    from capo_lightning.module import CAPOModule
    from capo_lightning.objectives import GRPO
    from capo_lightning.policy import PolicySpec
    from capo_lightning.selection import KeepAll

    print(f"\n=== step ratio: {model} ({prompts} prompts x {samples} samples, {new_tokens} new tokens) ===", flush=True)
    batch, gen_s = make_batch(model, prompts, samples, new_tokens)
    T = int(batch.response_mask.sum())
    adv = GRPO().advantages(batch.rewards, batch.group_ids)
    print(
        f"batch generated in {gen_s:.1f} s (not timed below): N={batch.num_completions}, "
        f"P+L={batch.input_ids.shape[1]} (L={batch.response_mask.shape[1]}), valid response tokens T={T}, "
        f"reward mean {batch.rewards.mean():.3f}, rows with non-zero advantage {int((adv != 0).sum())}/{adv.numel()}",
        flush=True,
    )

    torch.manual_seed(0)
    capo = CAPOSelector(**PAPER)
    keep = KeepAll()
    module = CAPOModule(
        policy=PolicySpec(model),
        objective=GRPO(),
        selector=capo,  # a CAPO run: configure_model builds the shadow-Adam state
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
        max_grad_norm=1.0,
    )
    schedule: list[str] = []
    for i in range(pairs + 1):  # pair 0 is warm-up
        schedule += ["capo", "keep"] if i % 2 == 0 else ["keep", "capo"]
    parts: dict[str, list[float]] = defaultdict(list)
    steps: list[tuple[str, float, dict]] = []
    views: list[TokenView] = []

    orig_step = module.training_step

    def timed_step(batch, batch_idx):  # names matter: Lightning inspects the signature
        kind = schedule[batch_idx]
        for key in ("forward", "select", "backward_step"):
            parts[key].clear()
        t0 = time.perf_counter()
        out = orig_step(batch, batch_idx)
        dt = time.perf_counter() - t0
        steps.append((kind, dt, {k: sum(v) for k, v in parts.items()}))
        return out

    module.training_step = timed_step
    module._score = _timed(parts, "forward", module._score)
    module._select = _timed(parts, "select", module._select)
    module._backward_and_step = _timed(parts, "backward_step", module._backward_and_step)
    capo.register_forward_pre_hook(lambda mod, args: views.__setitem__(slice(None), [args[0]]))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(schedule),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Alternate.make(schedule, {"capo": capo, "keep": keep})],
    )
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=_FixedBatches([batch] * len(schedule)))
    print(f"{len(schedule)} training steps in {time.perf_counter() - t0:.1f} s wall (incl. setup)", flush=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    timed = steps[2:]  # drop warm-up pair
    arm = {k: [dt for kind, dt, _ in timed if kind == k] for k in ("capo", "keep")}
    comp = {
        k: {p: _median([c[p] for kind, _, c in timed if kind == k]) for p in ("forward", "select", "backward_step")}
        for k in ("capo", "keep")
    }
    pair_ratios = []
    for i in range(0, len(timed), 2):
        a, b = timed[i], timed[i + 1]
        t = {a[0]: a[1], b[0]: b[1]}
        pair_ratios.append(t["capo"] / t["keep"])
    med = {k: _median(v) for k, v in arm.items()}
    res = {
        "model": model,
        "T": T,
        "capo_s": arm["capo"],
        "keep_s": arm["keep"],
        "median_capo_s": med["capo"],
        "median_keep_s": med["keep"],
        "ratio_of_medians": med["capo"] / med["keep"],
        "median_pair_ratio": _median(pair_ratios),
        "pair_ratios": pair_ratios,
        "components": comp,
        "reject_rate": metrics.get("select/token_reject_rate"),
    }
    print(f"per-step seconds, CAPO   : {' '.join(f'{x:.3f}' for x in arm['capo'])}")
    print(f"per-step seconds, KeepAll: {' '.join(f'{x:.3f}' for x in arm['keep'])}")
    print(f"per-pair ratios          : {' '.join(f'{x:.3f}' for x in pair_ratios)}")
    for k in ("capo", "keep"):
        c = comp[k]
        print(
            f"median {k:4s}: step {med[k]:.3f} s = forward {c['forward']:.3f} + select {c['select']:.3f} "
            f"+ backward/clip/AdamW {c['backward_step']:.3f} + rest {med[k] - sum(c.values()):.3f}"
        )
    print(
        f"RATIO {model}: CAPO/KeepAll step time = {res['ratio_of_medians']:.3f} (ratio of medians), "
        f"{res['median_pair_ratio']:.3f} (median of {len(pair_ratios)} pair ratios); "
        f"last CAPO reject rate {res['reject_rate']}",
        flush=True,
    )
    if profile and views:
        res["phases"] = profile_selector(capo, views[0])
    return res


def profile_selector(selector: CAPOSelector, view: TokenView, repeats: int = 3) -> dict:
    """Replay one real TokenView through a copy of the selector: per-phase medians, then torch.profiler."""
    import capo_lightning.selection.capo as capo_mod

    V, d = view.lm_head.shape
    T = int(view.response_mask.sum())
    print(f"-- selector breakdown on the captured view: T={T}, V={V}, d={d}, k={selector.top_k}")
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        sel = copy.deepcopy(selector)
        rec: dict[str, list[float]] = defaultdict(list)
        orig_topk = capo_mod.C.topk_policy
        capo_mod.C.topk_policy = _timed(rec, "topk_policy (logits h W^T + topk, chunked)", orig_topk)
        sel._token_shifts = _timed(rec, "_token_shifts ([chunk,k,d] grads, Adam direction, shifts)", sel._token_shifts)
        sel._global = _timed(rec, "_global x2 (pre + post: [V,d] row sums, dense ops, u)", sel._global)
        sel._advance = _timed(rec, "_advance (shadow-Adam m, v update on touched rows)", sel._advance)
        sel._metrics = _timed(rec, "_metrics (means, max, quantiles x4)", sel._metrics)
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                sel(view)
            total = time.perf_counter() - t0
        finally:
            capo_mod.C.topk_policy = orig_topk
        for k, v in rec.items():
            times[k].append(sum(v))
        times["TOTAL selector.forward"].append(total)
    med = {k: _median(v) for k, v in times.items()}
    rest = med["TOTAL selector.forward"] - sum(v for k, v in med.items() if k != "TOTAL selector.forward")
    med["rest (masks, scatter, bookkeeping)"] = rest
    for k, v in med.items():
        print(f"   {v * 1e3:9.1f} ms  {k}")

    sel = copy.deepcopy(selector)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        sel(view)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=28)
    print("   torch.profiler, one selector.forward, top ops by self CPU time:")
    print("\n".join("   " + line for line in table.splitlines()))
    return {k: v for k, v in med.items()}


# ================================================================================================
# Part 2: the curvature pass alone
# ================================================================================================
def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _synthetic_view(V: int, T: int, d: int, seed: int = 0) -> TokenView:
    g = torch.Generator().manual_seed(seed)
    L = 64
    N = max(1, T // L)
    W = torch.randn(V, d, generator=g) * 0.02
    hidden = torch.randn(N, L, d, generator=g)
    flat = hidden.reshape(-1, d)
    actions = torch.empty(N * L, dtype=torch.long)
    pick = torch.randint(0, 5, (N * L,), generator=g)
    chunk = C.token_chunk(V)
    for s in range(0, N * L, chunk):  # a plausible sampled token: one of the 5 most likely
        top5 = (flat[s : s + chunk] @ W.T).topk(5, dim=-1).indices
        actions[s : s + chunk] = top5.gather(1, pick[s : s + chunk, None]).squeeze(1)
    adv = torch.randn(N, 1, generator=g).sign().expand(N, L).contiguous()
    return TokenView(
        actions=actions.reshape(N, L),
        response_mask=torch.ones(N, L, dtype=torch.bool),
        advantages=adv,
        old_logprobs=torch.zeros(N, L),
        hidden=hidden,
        lm_head=W,
        lr=LR,
    )


def _steady_selector(V: int, d: int) -> CAPOSelector:
    sel = CAPOSelector(**PAPER)
    sel.build(V, d)
    g = torch.Generator().manual_seed(1)
    sel.adam_m.copy_(torch.randn(V, d, generator=g) * 1e-4)
    sel.adam_v.copy_(torch.rand(V, d, generator=g) * 1e-8)
    sel.adam_step.fill_(10)
    return sel


def sweep_worker(V: int, T: int, d: int, mode: str, repeats: int) -> dict:
    view = _synthetic_view(V, T, d)
    sel = _steady_selector(V, d)
    gc.collect()
    if mode == "mem":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_kib("VmRSS")
        with torch.no_grad():
            sel(view)
        peak = _proc_kib("VmHWM")
        return {"V": V, "T": T, "d": d, "peak_extra_mib": (peak - base) / 1024, "base_mib": base / 1024}
    with torch.no_grad():
        sel(view)  # warm-up
        flat_h, flat_a = view.hidden.reshape(-1, d), view.actions.reshape(-1)
        fwd, topk = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sel(view)
            fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            C.topk_policy(flat_h, view.lm_head, flat_a, sel.top_k)
            topk.append(time.perf_counter() - t0)
    return {"V": V, "T": T, "d": d, "forward_s": _median(fwd), "topk_s": _median(topk), "all_forward_s": fwd}


def _run_worker(V: int, T: int, d: int, mode: str, repeats: int) -> dict:
    env = dict(os.environ)
    if mode == "mem":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--_worker", f"{V},{T},{d},{mode},{repeats}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {cmd} failed:\n{out.stdout}\n{out.stderr}")


def sweep(repeats: int, d: int = 576) -> list[dict]:
    print(f"\n=== curvature pass alone: CAPOSelector.forward, d={d}, k=50, steady-state shadow Adam ===", flush=True)
    configs = [(1024, 1024), (32768, 1024), (151936, 1024), (32768, 256), (32768, 4096)]
    rows = []
    print(
        f"{'V':>7} {'T':>5} | {'forward s':>9} {'topk s':>7} {'topk %':>6} | {'peak extra MiB':>14} "
        f"{'state MiB':>9} {'[c,k,d] MiB':>11} {'[V,d] MiB':>9}"
    )
    for V, T in configs:
        t = _run_worker(V, T, d, "time", repeats)
        m = _run_worker(V, T, d, "mem", 1)
        k = 50
        chunk = max(1, C.LOGIT_BUDGET // (k * d))
        row = {
            **t,
            **m,
            "state_mib": _mib(2 * V * d * 4),
            "block_mib": _mib(min(T, chunk) * k * d * 4),
            "vd_mib": _mib(V * d * 4),
        }
        rows.append(row)
        print(
            f"{V:>7} {T:>5} | {row['forward_s']:>9.3f} {row['topk_s']:>7.3f} {100 * row['topk_s'] / row['forward_s']:>5.0f}% "
            f"| {row['peak_extra_mib']:>14.0f} {row['state_mib']:>9.0f} {row['block_mib']:>11.0f} {row['vd_mib']:>9.0f}",
            flush=True,
        )
    print(
        "peak extra = VmHWM - VmRSS around one steady-state call (transient, on top of inputs and state); "
        "state = persistent shadow-Adam m+v (2 V d fp32); [c,k,d] = one gradient block; [V,d] = one dense row buffer"
    )
    return rows


# ================================================================================================
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="step ratio on the tiny random Qwen2")
    p.add_argument("--smollm2", action="store_true", help="step ratio on SmolLM2-135M-Instruct")
    p.add_argument("--sweep", action="store_true", help="CAPOSelector.forward time/memory vs V and T")
    p.add_argument("--pairs-tiny", type=int, default=12, help="timed CAPO/KeepAll pairs, tiny (plus 1 warm-up)")
    p.add_argument("--pairs-smollm2", type=int, default=5, help="timed CAPO/KeepAll pairs, SmolLM2 (plus 1 warm-up)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--sweep-repeats", type=int, default=3)
    p.add_argument("--no-profile", action="store_true", help="skip the selector breakdown / torch.profiler table")
    p.add_argument("--json", type=str, default=None, help="also write all results to this JSON file")
    p.add_argument("--_worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._worker:
        V, T, d, mode, repeats = args._worker.split(",")
        print("RESULT " + json.dumps(sweep_worker(int(V), int(T), int(d), mode, int(repeats))), flush=True)
        return

    run_all = not (args.tiny or args.smollm2 or args.sweep)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    t_start = time.perf_counter()
    results: dict = {}
    for name, flag, model, pairs in (
        ("tiny", args.tiny, "tiny", args.pairs_tiny),
        ("smollm2", args.smollm2, "bundled:smollm2-135m-instruct", args.pairs_smollm2),
    ):
        if run_all or flag:
            results[name] = bench_step(model, pairs, args.prompts, args.samples, args.new_tokens, not args.no_profile)
    if run_all or args.sweep:
        results["sweep"] = sweep(args.sweep_repeats)

    print("\n=== summary ===")
    for name in ("tiny", "smollm2"):
        if name in results:
            r = results[name]
            print(
                f"{name:8s} T={r['T']:5d}: CAPO {r['median_capo_s']:.3f} s / KeepAll {r['median_keep_s']:.3f} s "
                f"= {r['ratio_of_medians']:.3f} (median pair ratio {r['median_pair_ratio']:.3f})"
            )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
