"""What CAPO token selection costs: training-step ratio CAPO / KeepAll, and the curvature pass alone.

Run from the repository root (CPU, offline)::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/capo_overhead.py            # everything
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/capo_overhead.py --smollm2  # one part

``--tiny`` / ``--smollm2`` time interleaved CAPO and KeepAll training steps on one fixed rollout batch in
one real Trainer; ``--sweep`` times ``CAPOSelector.forward`` alone against V and T. The method (what
is timed, why arms are interleaved, how memory and page faults are measured) is in
``benchmarks/README.md``."""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import resource
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

from capo_lightning.selection import curvature, global_shifts, subspace  # noqa: E402
from capo_lightning.selection.base import TokenView  # noqa: E402
from capo_lightning.selection.capo import CAPOSelector  # noqa: E402

_LIBRARY_BLOCK_BUDGET = subspace.BLOCK_BUDGET
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
    from capo_lightning.models.policy import PolicySpec
    from capo_lightning.module import CAPOModule
    from capo_lightning.rewards import math_reward
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
    dm.connect(gen.engine, gen.tokenizer)
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
        from lightning import Callback

        class Alternate(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                pl_module.selector = selectors[schedule[batch_idx]]

        return Alternate()


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh pages, e.g. new mmaps)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(record: dict, key: str, fn, cpu: dict | None = None):
    """Wrap ``fn`` so each call appends its wall seconds to record[key] (and process CPU seconds to cpu[key])."""

    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            record[key].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu[key].append(time.process_time() - c0)

    return wrapper


def bench_step(model: str, pairs: int, prompts: int, samples: int, new_tokens: int, profile: bool) -> dict:
    """Interleaved CAPO / KeepAll training steps on one fixed batch; returns the summary."""
    from lightning import Trainer

    from capo_lightning.models.policy import PolicySpec
    from capo_lightning.module import CAPOModule
    from capo_lightning.objectives import GRPO
    from capo_lightning.selection import KeepAll
    from capo_lightning.training import parts as step_parts
    from capo_lightning.training import schedules

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
    parts: dict[str, list[float]] = defaultdict(list)  # wall seconds of the current step's parts
    parts_cpu: dict[str, list[float]] = defaultdict(list)  # process CPU seconds (all threads) of the same
    steps: list[dict] = []
    views: list[TokenView] = []
    names = ("forward", "select", "backward_step")

    orig_step = module.training_step

    in_step_phases: list[dict[str, float]] = []
    inst = _Instrument(capo)  # phase timers on the live selector, installed for the whole fit

    def timed_step(batch, batch_idx):  # names matter: Lightning inspects the signature
        for key in names:
            parts[key].clear()
            parts_cpu[key].clear()
        f0 = _minor_faults()
        t0, c0 = time.perf_counter(), time.process_time()
        out = orig_step(batch, batch_idx)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rec = {"kind": schedule[batch_idx], "wall": wall, "cpu": cpu, "minor_faults": _minor_faults() - f0}
        for key in names:
            rec[key], rec[key + "_cpu"] = sum(parts[key]), sum(parts_cpu[key])
        rec["rest"] = wall - sum(rec[k] for k in names)
        rec["select_minor_faults"] = sum(parts["select_faults"])
        parts["select_faults"].clear()
        steps.append(rec)
        if rec["kind"] == "capo":
            in_step_phases.append(inst.finish())
        return out

    def faults_of_select(*args, **kwargs):
        f0 = _minor_faults()
        try:
            return timed_select(*args, **kwargs)
        finally:
            parts["select_faults"].append(_minor_faults() - f0)

    module.training_step = timed_step
    # the step's parts are functions of capo_lightning.training.schedules / .parts, looked up at call time
    originals = {"policy_forward": schedules.policy_forward, "decide": schedules.decide}
    originals["optimizer_step"] = step_parts.optimizer_step
    schedules.policy_forward = _timed(parts, "forward", originals["policy_forward"], parts_cpu)
    timed_select = _timed(parts, "select", originals["decide"], parts_cpu)
    schedules.decide = faults_of_select
    step_parts.optimizer_step = _timed(parts, "backward_step", originals["optimizer_step"], parts_cpu)
    capo.register_forward_pre_hook(lambda mod, args: views.__setitem__(slice(None), [args[0]]))

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(schedule),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Alternate.make(schedule, {"capo": capo, "keep": keep})],
    )
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        with inst:
            trainer.fit(module, train_dataloaders=_FixedBatches([batch] * len(schedule)))
    finally:
        for name, fn in originals.items():
            setattr(step_parts if name == "optimizer_step" else schedules, name, fn)
    print(
        f"{len(schedule)} training steps in {time.perf_counter() - t0:.1f} s wall (incl. setup); "
        f"1-min load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)",
        flush=True,
    )

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    timed = steps[2:]  # drop the warm-up pair
    by = {k: [r for r in timed if r["kind"] == k] for k in ("capo", "keep")}
    med = {k: {f: _median([r[f] for r in rows]) for f in timed[0] if f != "kind"} for k, rows in by.items()}
    pair_wall, pair_cpu = [], []
    for i in range(0, len(timed), 2):
        pair = {r["kind"]: r for r in timed[i : i + 2]}
        pair_wall.append(pair["capo"]["wall"] / pair["keep"]["wall"])
        pair_cpu.append(pair["capo"]["cpu"] / pair["keep"]["cpu"])
    res = {
        "model": model,
        "T": T,
        "steps": timed,
        "median": med,
        "ratio_of_medians": med["capo"]["wall"] / med["keep"]["wall"],
        "median_pair_ratio": _median(pair_wall),
        "ratio_of_medians_cpu": med["capo"]["cpu"] / med["keep"]["cpu"],
        "median_pair_ratio_cpu": _median(pair_cpu),
        # the selection's own cost relative to a KeepAll step (least sensitive to load: small numerator)
        "select_added_cpu": med["capo"]["select_cpu"] / med["keep"]["cpu"],
        "pair_ratios": pair_wall,
        "pair_ratios_cpu": pair_cpu,
        "reject_rate": metrics.get("select/token_reject_rate"),
    }
    for k, label in (("capo", "CAPO   "), ("keep", "KeepAll")):
        walls = " ".join(f"{r['wall']:.3f}" for r in by[k])
        cpus = " ".join(f"{r['cpu']:.3f}" for r in by[k])
        print(f"per-step wall s, {label}: {walls}")
        print(f"per-step CPU s,  {label}: {cpus}")
    print(f"per-pair ratios, wall     : {' '.join(f'{x:.3f}' for x in pair_wall)}")
    print(f"per-pair ratios, CPU      : {' '.join(f'{x:.3f}' for x in pair_cpu)}")
    for k in ("capo", "keep"):
        m = med[k]
        print(
            f"median {k:4s}: step {m['wall']:.3f} s wall ({m['cpu']:.3f} s CPU) = forward {m['forward']:.3f} "
            f"+ select {m['select']:.3f} ({m['select_cpu']:.3f} CPU) + backward/clip/AdamW {m['backward_step']:.3f} "
            f"+ rest {m['rest']:.3f}   [medians per part]"
        )
    print(
        f"RATIO {model}: CAPO/KeepAll step time = {res['ratio_of_medians']:.3f} wall (ratio of medians), "
        f"{res['median_pair_ratio']:.3f} (median of {len(pair_wall)} pair ratios); CPU time: "
        f"{res['ratio_of_medians_cpu']:.3f} (ratio of medians), {res['median_pair_ratio_cpu']:.3f} (median pair); "
        f"1 + select CPU / KeepAll step CPU = {1 + res['select_added_cpu']:.3f}; "
        f"last CAPO reject rate {res['reject_rate']}",
        flush=True,
    )
    faults = {k: med[k]["minor_faults"] for k in med}
    print(
        f"minor page faults per step (median): CAPO {faults['capo']:.0f} (of which in selection "
        f"{med['capo']['select_minor_faults']:.0f}, = {med['capo']['select_minor_faults'] * 4 / 2**20:.2f} GiB "
        f"of freshly touched 4 KiB pages), KeepAll {faults['keep']:.0f}"
    )
    timed_phases = in_step_phases[1:]  # the first CAPO step belongs to the warm-up pair
    if timed_phases:
        res["in_step_phases"] = {k: _median([p.get(k, 0.0) for p in timed_phases]) for k in timed_phases[0]}
        print(f"-- CAPOSelector.forward inside the training step (median of {len(timed_phases)} CAPO steps), by phase:")
        _print_phases(res["in_step_phases"])
    if profile and views:
        res["phases"] = profile_selector(capo, views[0])
    return res


_OUTER = {  # phase -> label: curvature functions the selector calls, then CAPOSelector methods
    "token_shifts": "token level: [chunk,k,d] grads, Adam direction, shifts",
    "batch_shifts": "global level x2 (pre + post): [V,d] row sums, dense ops, u",
    "_advance": "shadow-Adam m, v update on touched rows",
    "_metrics": "metrics: means, max, 4 quantiles",
}
_OUTER_FUNCTIONS = ("token_shifts", "batch_shifts")  # patched on the curvature modules
_OUTER_METHODS = ("_advance", "_metrics")  # patched on the selector instance
_INNER = ("topk_policy", "token_gradients", "adam_direction", "shifts_from_direction", "row_gradient_sums")


class _Instrument:
    """Times a CAPOSelector's calls by phase while installed (``with _Instrument(sel) as rec:``).

    Outer phases are the batch-level curvature functions and the selector's own methods; inner ones
    the curvature functions they call, attributed to the outer phase that is running
    ("batch_shifts/row_gradient_sums"). ``finish()`` adds "<outer>/other", the outer phase's own code
    (e.g. the dense [V, d] ops of ``batch_shifts``), and "forward/other". Curvature functions are looked
    up as module attributes at call time, so patching each module that holds the name (``curvature``,
    ``global_shifts``) reaches the calls inside it."""

    def __init__(self, sel: CAPOSelector) -> None:
        self.sel, self.rec = sel, defaultdict(float)
        self.stack = ["forward"]

    def _wrap(self, name: str, fn, outer: bool):
        def wrapper(*args, **kwargs):
            key = name if outer else f"{self.stack[-1]}/{name}"
            if outer:
                self.stack.append(name)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.rec[key] += time.perf_counter() - t0
                if outer:
                    self.stack.pop()

        return wrapper

    def __enter__(self) -> _Instrument:
        self.originals = {
            (module, name): getattr(module, name)
            for module in (curvature, global_shifts)
            for name in (*_INNER, *_OUTER_FUNCTIONS)
            if hasattr(module, name)
        }
        for (module, name), fn in self.originals.items():
            setattr(module, name, self._wrap(name, fn, outer=name in _OUTER_FUNCTIONS))
        for name in _OUTER_METHODS:
            setattr(self.sel, name, self._wrap(name, getattr(self.sel, name), outer=True))
        self.sel_forward = self.sel.forward
        self.sel.forward = self._wrap("TOTAL", self.sel_forward, outer=True)
        return self

    def __exit__(self, *exc) -> None:
        for (module, name), fn in self.originals.items():
            setattr(module, name, fn)
        for name in (*_OUTER_METHODS, "forward"):
            delattr(self.sel, name)

    def finish(self) -> dict[str, float]:
        """The phases recorded since the last ``finish()``, then reset."""
        rec, self.rec = dict(self.rec), defaultdict(float)
        for name in _OUTER:
            inner = sum(v for k, v in rec.items() if k.startswith(name + "/"))
            if name in rec and inner:
                rec[f"{name}/other"] = rec[name] - inner
        if "TOTAL" in rec:
            rec["forward/other"] = rec["TOTAL"] - sum(
                v for k, v in rec.items() if k in _OUTER or k.startswith(("forward/", "TOTAL/"))
            )
        return {k.replace("TOTAL/", "forward/"): v for k, v in rec.items()}


def phase_times(sel: CAPOSelector, view: TokenView) -> dict[str, float]:
    """Wall seconds of one ``sel(view)`` call split by phase (advances ``sel``'s shadow state)."""
    with _Instrument(sel) as inst, torch.no_grad():
        sel(view)
    return inst.finish()


def _print_phases(med: dict[str, float], indent: str = "   ") -> None:
    total = med["TOTAL"]
    print(f"{indent}{total * 1e3:9.1f} ms  100%  TOTAL CAPOSelector.forward")
    order = (
        ["forward/topk_policy"]
        + [k for outer in _OUTER for k in [outer] + sorted(x for x in med if x.startswith(outer + "/"))]
        + ["forward/other"]
    )
    for k in order:
        if k not in med:
            continue
        label = _OUTER.get(k, k.replace("forward/topk_policy", "topk_policy: logits h W^T [chunk,V] + topk"))
        pad = "" if ("/" not in k or k.startswith("forward/")) else "    "
        print(f"{indent}{med[k] * 1e3:9.1f} ms  {100 * med[k] / total:3.0f}%  {pad}{label}")


def profile_selector(selector: CAPOSelector, view: TokenView, repeats: int = 3) -> dict:
    """Replay one real TokenView through copies of the selector: per-phase medians, then torch.profiler."""
    V, d = view.lm_head.shape
    T = int(view.response_mask.sum())
    print(
        f"-- CAPOSelector.forward replayed after the fit on the last captured view (warm heap, no live autograd "
        f"graph): T={T}, V={V}, d={d}, k={selector.top_k}"
    )
    runs = [phase_times(copy.deepcopy(selector), view) for _ in range(repeats)]
    med = {k: _median([r.get(k, 0.0) for r in runs]) for k in runs[0]}
    print(f"   median of {repeats} calls, by phase:")
    _print_phases(med)

    sel = copy.deepcopy(selector)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        sel(view)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=28)
    print("   torch.profiler, one selector.forward, top ops by self CPU time:")
    print("\n".join("   " + line for line in table.splitlines()))
    return med


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
    chunk = curvature.token_chunk(V)
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
    runs = [phase_times(sel, view) for _ in range(repeats)]
    med = {k: _median([r.get(k, 0.0) for r in runs]) for k in runs[0]}
    return {
        "V": V,
        "T": T,
        "d": d,
        "forward_s": med["TOTAL"],
        "phases": med,
        "all_forward_s": [r["TOTAL"] for r in runs],
    }


_HEAP_REUSE = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
_RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _run_worker(V: int, T: int, d: int, mode: str, repeats: int, malloc: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(malloc or {})
    cmd = [sys.executable, __file__, "--_worker", f"{V},{T},{d},{mode},{repeats}"]
    if subspace.BLOCK_BUDGET != _LIBRARY_BLOCK_BUDGET:
        cmd += ["--block-budget", str(subspace.BLOCK_BUDGET)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {cmd} failed:\n{out.stdout}\n{out.stderr}")


def sweep(repeats: int, d: int = 576) -> list[dict]:
    print(f"\n=== curvature pass alone: CAPOSelector.forward, d={d}, k=50, steady-state shadow Adam ===", flush=True)
    configs = [(1024, 1024), (32768, 1024), (151936, 1024), (32768, 256), (32768, 4096)]
    rows = []
    cols = [
        ("topk", "forward/topk_policy"),
        ("token", "token_shifts"),
        ("global", "batch_shifts"),
        ("g:rows", "batch_shifts/row_gradient_sums"),
        ("g:dense", "batch_shifts/other"),
        ("adv", "_advance"),
        ("metr", "_metrics"),
    ]
    print(
        "time in seconds (median); memory in MiB. Times with glibc serving temporaries from the already-resident "
        "heap (MALLOC_MMAP_THRESHOLD_=4GiB), as in a warmed-up training process; 'fresh' = total with default "
        "glibc in a fresh process (every large temporary is a new mmap: page faults + kernel zeroing)"
    )
    print(
        f"{'V':>7} {'T':>5} | {'total':>6} "
        + " ".join(f"{c:>7}" for c, _ in cols)
        + f" | {'fresh':>6} | {'peak+':>6} {'state':>5} {'[ckd]':>5} {'[Vd]':>5}"
    )
    for V, T in configs:
        t = _run_worker(V, T, d, "time", repeats, _HEAP_REUSE)
        fresh = _run_worker(V, T, d, "time", repeats)
        m = _run_worker(V, T, d, "mem", 1, _RETURN_FREED)
        chunk = curvature.block_rows(50, d)
        row = {
            **t,
            **m,
            "forward_fresh_s": fresh["forward_s"],
            "phases_fresh": fresh["phases"],
            "state_mib": _mib(2 * V * d * 4),
            "block_mib": _mib(min(T, chunk) * 50 * d * 4),
            "vd_mib": _mib(V * d * 4),
        }
        rows.append(row)
        ph = row["phases"]
        print(
            f"{V:>7} {T:>5} | {row['forward_s']:>6.3f} "
            + " ".join(f"{ph.get(k, 0.0):>7.3f}" for _, k in cols)
            + f" | {row['forward_fresh_s']:>6.3f} | {row['peak_extra_mib']:>6.0f} {row['state_mib']:>5.0f}"
            + f" {row['block_mib']:>5.0f} {row['vd_mib']:>5.0f}",
            flush=True,
        )
    print(
        "total/topk/...: heap-reuse timing; topk = logits + topk; token = token-level shifts; "
        "global = both batch-level passes, of which g:rows = "
        "chunked [chunk,k,d] grads -> [V,d] row sums and g:dense = the pass's own [V,d] ops (zeros, masks, "
        "direction, <g,D>) and u; adv = shadow-Adam update; metr = metrics.\n"
        "peak+ = VmHWM - VmRSS around one steady-state call (transient, on top of inputs and state); state = "
        "persistent shadow-Adam m+v (2 V d fp32); [ckd] = one [chunk,k,d] gradient block; [Vd] = one dense [V,d] buffer"
    )
    return rows


# ================================================================================================
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="step ratio on the tiny random Qwen2")
    p.add_argument("--smollm2", action="store_true", help="step ratio on SmolLM2-135M-Instruct")
    p.add_argument("--sweep", action="store_true", help="CAPOSelector.forward time/memory vs V and T")
    p.add_argument("--pairs-tiny", type=int, default=12, help="timed CAPO/KeepAll pairs, tiny (plus 1 warm-up)")
    p.add_argument("--pairs-smollm2", type=int, default=4, help="timed CAPO/KeepAll pairs, SmolLM2 (plus 1 warm-up)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--sweep-repeats", type=int, default=3)
    p.add_argument(
        "--block-budget",
        type=int,
        default=None,
        help="what-if experiment: elements of one [chunk,k,d] block of the curvature pass (sets "
        "subspace.BLOCK_BUDGET, which block_rows reads at call time, in this process and its sweep workers; "
        "topk_policy's [chunk,V] logits keep LOGIT_BUDGET). Default: the library's 2**21",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the selector breakdown / torch.profiler table")
    p.add_argument("--json", type=str, default=None, help="also write all results to this JSON file")
    p.add_argument("--_worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.block_budget:
        subspace.BLOCK_BUDGET = args.block_budget  # read at call time by curvature.block_rows
        assert curvature.block_rows(50, 576) == max(1, args.block_budget // (50 * 576)), "the knob must take effect"
        if not args._worker:
            print(f"WHAT-IF: [chunk,k,d] block budget {args.block_budget} elements (library: {_LIBRARY_BLOCK_BUDGET})")
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
            m = r["median"]
            print(
                f"{name:8s} T={r['T']:5d}: wall CAPO {m['capo']['wall']:.3f} s / KeepAll {m['keep']['wall']:.3f} s "
                f"= {r['ratio_of_medians']:.3f} (median pair {r['median_pair_ratio']:.3f}); CPU "
                f"{m['capo']['cpu']:.3f} / {m['keep']['cpu']:.3f} = {r['ratio_of_medians_cpu']:.3f} "
                f"(median pair {r['median_pair_ratio_cpu']:.3f}); "
                f"1 + select/step (CPU) = {1 + r['select_added_cpu']:.3f}"
            )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
