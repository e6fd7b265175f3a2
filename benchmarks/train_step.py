r"""The training step: CAPO vs KeepAll vs a minimal hand-written step, interleaved in one process, CPU or GPU.

Run from the repository root, offline::

    .venv/bin/python benchmarks/train_step.py --shape smollm2-135m                 # CPU, ~6 min on 2 cores
    python benchmarks/train_step.py --shape qwen2.5-1.5b --device cuda             # GPU, the paper's step
    python benchmarks/train_step.py --shape qwen2.5-7b --device cuda               # GPU, bf16 weights

Model: a random-init transformers model at a named shape (``SHAPES``: SmolLM2-135M, Qwen2.5-1.5B, Qwen2.5-7B;
no download), built directly on the device. Batch: a synthetic rollout batch of ``--prompts`` x ``--samples``
completions, prompts of random length up to ``--prompt-len`` (left padded), responses of random length
between 1/5 of and ``--response-len`` (right padded; mean ~0.6 x), random tokens, 0/1 rewards with
variance in every group. Every arm trains on that same batch.

Arms, all inside ONE ``lightning.Trainer`` fit of ONE ``CAPOModule`` (manual optimization, AdamW lr 1e-6,
grad-clip 1.0, GRPO, ``ppo_epochs = minibatches = 1``, ``--micro`` rows per micro-batch):

``CAPO``
    ``module.selector = CAPOSelector()`` (paper thresholds, top-50, shadow Adam), then the module's own
    ``training_step`` (look-ahead pass when micro-batched, selection, loss, backward, clip, step, metrics).
``KeepAll``
    ``module.selector = KeepAll()``, then the module's own ``training_step``.
``minimal``
    A hand-written policy-gradient step on the same model, batch and AdamW: per micro-batch one forward
    with ``logits_to_keep``, logprobs as logit - logsumexp of the fp32 logits, the GRPO loss (per-sequence
    token mean, then batch mean, ratio 1), backward; then clip and the optimizer step. No metrics.

The arms run in rounds whose order rotates (C K M, K M C, M C K, ...); ``--warmup`` rounds are dropped
(the first CAPO call sees an empty shadow Adam). Timed: the whole step call, with ``torch.cuda.synchronize``
on both sides on a GPU; CAPO's selector call is timed the same way. Memory: the peak allocated by the step
(GPU: ``torch.cuda.max_memory_allocated`` after a reset; CPU: the process's resident high-water mark,
``VmHWM`` after ``/proc/self/clear_refs``), which includes weights, gradients and optimizer state, the
same for every arm. Printed: per arm the median step time, response tokens per second and the peak memory;
then the ``RATIO`` lines (CAPO/KeepAll, KeepAll/minimal step time; KeepAll/minimal, CAPO/minimal peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `capo_lightning`

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402

import capo_lightning.scale.loading as loading_file  # noqa: E402
from capo_lightning.batch import RolloutBatch  # noqa: E402
from capo_lightning.models.policy import PolicySpec, _enable_checkpointing  # noqa: E402
from capo_lightning.module import CAPOModule  # noqa: E402
from capo_lightning.selection import CAPOSelector, KeepAll  # noqa: E402
from capo_lightning.selection.capo import CAPOSelector as _Selector  # noqa: E402

SHAPES = {  # name -> (config class, config kwargs, defaults: prompts, samples, prompt_len, response_len, micro)
    "smollm2-135m": (
        LlamaConfig,
        dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192),
        dict(prompts=4, samples=8, prompt_len=64, response_len=64, micro=None, dtype="float32", ckpt=False),
    ),
    "qwen2.5-1.5b": (
        Qwen2Config,
        dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768),
        dict(prompts=12, samples=8, prompt_len=512, response_len=1024, micro=8, dtype="float32", ckpt=True),
    ),
    "qwen2.5-7b": (
        Qwen2Config,
        dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=32768),
        dict(prompts=6, samples=8, prompt_len=512, response_len=1024, micro=4, dtype="bfloat16", ckpt=True),
    ),
}  # fmt: skip
ARMS = ("CAPO", "KeepAll", "minimal")


def build_model(shape: str, dtype: torch.dtype, device: str, ckpt: bool) -> torch.nn.Module:
    """A random-init model of the named shape, built on ``device`` (no download, no file)."""
    config_cls, kwargs, _ = SHAPES[shape]
    config = config_cls(**kwargs)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if ckpt:
        _enable_checkpointing(model)
    return model.train()


def synthetic_batch(args: argparse.Namespace, vocab: int, seed: int = 0) -> RolloutBatch:
    """A paper-shaped rollout batch: random prompt and response lengths, random tokens, 0/1 rewards per group."""
    gen = torch.Generator().manual_seed(seed)
    n, p, length = args.prompts * args.samples, args.prompt_len, args.response_len
    prompt_lens = torch.randint(p // 4, p + 1, (n,), generator=gen)
    resp_lens = torch.randint(max(1, length // 5), length + 1, (n,), generator=gen)
    ids = torch.randint(0, vocab, (n, p + length), generator=gen)
    positions = torch.arange(p + length)
    attention = (positions >= p - prompt_lens[:, None]) & (positions < p + resp_lens[:, None])
    response_mask = attention[:, p:]
    rewards = (torch.rand(n, generator=gen) < 0.5).float()
    rewards.view(args.prompts, args.samples)[:, 0] = 1.0  # every group has variance
    rewards.view(args.prompts, args.samples)[:, 1] = 0.0
    return RolloutBatch(
        input_ids=ids * attention,
        attention_mask=attention,
        response_mask=response_mask,
        behavior_logprobs=torch.full(response_mask.shape, -1.0) * response_mask,
        rewards=rewards,
        group_ids=torch.arange(args.prompts).repeat_interleave(args.samples),
        truncated=resp_lens == length,
        policy_version=0,
        max_new_tokens=length,
    )


def minimal_step(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch, micro: int) -> None:
    """The hand-written reference: one forward per micro-batch, logit - logsumexp, GRPO loss, backward, clip, AdamW."""
    n, length = batch.num_completions, batch.response_mask.shape[1]
    rewards = batch.rewards.view(-1, int((batch.group_ids == 0).sum()))
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
    for s in range(0, n, micro):
        ids, attn = batch.input_ids[s : s + micro], batch.attention_mask[s : s + micro]
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        logits = policy(input_ids=ids, attention_mask=attn.long(), position_ids=pos, logits_to_keep=length + 1).logits
        logits = logits[:, :-1].float()
        actions = ids[:, -length:]
        logp = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        mask = batch.response_mask[s : s + micro].float()
        per_seq = (-(adv[s : s + micro, None] * logp) * mask).sum(1) / mask.sum(1).clamp(min=1)
        (per_seq.sum() / n).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Repeat:
    """A sized iterable yielding the same batch ``times`` times (a Lightning train dataloader)."""

    def __init__(self, batch: RolloutBatch, times: int) -> None:
        self.batch, self.times = batch, times

    def __len__(self) -> int:
        return self.times

    def __iter__(self):  # noqa: ANN204
        return iter([self.batch] * self.times)


class Meter:
    """Times a call and measures its peak memory, on the device the model lives on."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.sync()
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        """(seconds, peak GiB) since :meth:`start`."""
        self.sync()
        seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            return seconds, torch.cuda.max_memory_allocated(self.device) / 2**30
        status = Path("/proc/self/status").read_text().split("\n")
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
        return seconds, kib / 2**20


class Rounds(L.Callback):
    """Runs each training step as the arm of the schedule, timing it (the module's training_step is wrapped)."""

    def __init__(self, module: CAPOModule, batch: RolloutBatch, schedule: list[str], micro: int) -> None:
        self.schedule, self.records = schedule, []
        self.selectors = {"CAPO": CAPOSelector(), "KeepAll": KeepAll()}
        self.module, self.batch, self.micro = module, batch, micro
        self._step = module.training_step
        module.training_step = self.training_step
        self._judge, self._close = _Selector.judge, _Selector.close  # forward = judge (all rows) + close
        self.selector_s = 0.0

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> dict:
        arm = self.schedule[batch_idx]
        meter = Meter(batch.input_ids.device)
        self.selector_s = 0.0
        out: dict = {}
        if arm == "minimal":
            meter.start()
            minimal_step(self.module.policy, self.module.optimizers().optimizer, batch, self.micro)
        else:
            self.module.selector = self.selectors[arm].to(batch.input_ids.device)
            meter.start()
            out = self._step(batch, batch_idx)
        seconds, peak = meter.stop()
        tokens = int(batch.response_mask.sum())
        self.records.append(dict(arm=arm, index=batch_idx, seconds=seconds, peak_gib=peak, tokens=tokens,
                                 selector_s=self.selector_s))  # fmt: skip
        return out

    def timed(self, method, selector: _Selector, *args: object) -> object:  # noqa: ANN001
        """Time a selector call (device synchronised; the step's memory peak is not reset)."""
        meter = Meter(selector.adam_m.device)
        meter.sync()
        start = time.perf_counter()
        out = method(selector, *args)
        meter.sync()
        self.selector_s += time.perf_counter() - start
        return out


def run(args: argparse.Namespace) -> dict:
    """Build, fit the interleaved schedule, and summarise."""
    config_cls, kwargs, defaults = SHAPES[args.shape]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    model = build_model(args.shape, dtype, args.device, args.ckpt)
    loading_file.load_policy = lambda _spec: (model, None)  # the random-init model instead of a checkpoint
    n = args.prompts * args.samples
    micro = args.micro or n
    module = CAPOModule(policy=PolicySpec(dtype=args.dtype), micro_batch_size=args.micro,
                        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6))  # fmt: skip
    batch = synthetic_batch(args, kwargs["vocab_size"])
    schedule = []
    for r in range(args.warmup + args.rounds):
        schedule += [ARMS[(r + i) % len(ARMS)] for i in range(len(ARMS))]
    rounds = Rounds(module, batch, schedule, micro)
    _Selector.judge = lambda selector, view, rows: rounds.timed(rounds._judge, selector, view, rows)
    _Selector.close = lambda selector: rounds.timed(rounds._close, selector)
    precision = args.precision or ("bf16-true" if dtype == torch.bfloat16 else
                                   "bf16-mixed" if device.type == "cuda" else "32-true")  # fmt: skip
    trainer = L.Trainer(
        accelerator=device.type if device.type != "cpu" else "cpu", devices=1, precision=precision,
        max_steps=-1, max_epochs=1, limit_train_batches=len(schedule), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[rounds],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=Repeat(batch, len(schedule)))
    return summarise(args, rounds.records, precision)


def summarise(args: argparse.Namespace, records: list[dict], precision: str) -> dict:
    """Medians per arm after the warm-up rounds, and the ratios."""
    kept = records[args.warmup * len(ARMS) :]
    arms = {}
    for arm in ARMS:
        rows = [r for r in kept if r["arm"] == arm]
        seconds = statistics.median(r["seconds"] for r in rows)
        arms[arm] = dict(
            step_s=seconds,
            tokens_per_s=rows[0]["tokens"] / seconds,
            peak_gib=max(r["peak_gib"] for r in rows),
            selector_s=statistics.median(r["selector_s"] for r in rows),
            steps=[round(r["seconds"], 3) for r in rows],
        )
    ratios = {
        "CAPO/KeepAll step time": arms["CAPO"]["step_s"] / arms["KeepAll"]["step_s"],
        "KeepAll/minimal step time": arms["KeepAll"]["step_s"] / arms["minimal"]["step_s"],
        "CAPO/minimal step time": arms["CAPO"]["step_s"] / arms["minimal"]["step_s"],
        "KeepAll/minimal peak memory": arms["KeepAll"]["peak_gib"] / arms["minimal"]["peak_gib"],
        "CAPO/minimal peak memory": arms["CAPO"]["peak_gib"] / arms["minimal"]["peak_gib"],
    }
    setup = {k: getattr(args, k) for k in ("shape", "device", "prompts", "samples", "prompt_len", "response_len",
                                           "micro", "dtype", "ckpt", "rounds", "warmup")}  # fmt: skip
    return dict(setup=setup | {"precision": precision, "response_tokens": records[0]["tokens"]}, arms=arms,
                ratios=ratios)  # fmt: skip


def report(result: dict) -> None:
    setup = result["setup"]
    print(f"\nshape {setup['shape']} on {setup['device']} ({setup['precision']}, grad-ckpt {setup['ckpt']}): "
          f"{setup['prompts']} x {setup['samples']} completions, prompt <= {setup['prompt_len']}, response <= "
          f"{setup['response_len']}, {setup['response_tokens']} response tokens, micro-batch "
          f"{setup['micro']}")  # fmt: skip
    print(f"{'arm':<8} {'step s (median)':>16} {'tokens/s':>10} {'peak GiB':>9} {'selector s':>11}  steps")
    for arm, a in result["arms"].items():
        print(f"{arm:<8} {a['step_s']:>16.3f} {a['tokens_per_s']:>10.0f} {a['peak_gib']:>9.2f} "
              f"{a['selector_s']:>11.3f}  {a['steps']}")  # fmt: skip
    for name, value in result["ratios"].items():
        print(f"RATIO {setup['shape']} {setup['device']}: {name} = {value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    for name in ("prompts", "samples", "prompt-len", "response-len", "micro"):
        parser.add_argument(f"--{name}", type=int, default=None, help="default: the shape's")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights; default: the shape's")
    parser.add_argument("--precision", default=None, help="Trainer precision; default bf16-mixed on GPU, 32-true CPU")
    parser.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=None, help="gradient checkpointing")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every arm once)")
    parser.add_argument("--warmup", type=int, default=1, help="dropped rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
