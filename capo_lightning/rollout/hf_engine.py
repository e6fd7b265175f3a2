"""Rollouts on the policy object itself (the CPU default): capo's decoding loop, or transformers
``generate``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from capo_lightning.models.lora import transformers_model
from capo_lightning.rollout.decode import decode
from capo_lightning.rollout.engine import Completion, RolloutEngine, SamplingConfig

LOOPS = ("compact", "generate")


class HFEngine(RolloutEngine):
    """Samples on the policy object itself; shares the policy, so weights are never stale.

    ``loop="compact"`` (the default) decodes with :func:`capo_lightning.rollout.decode.decode`,
    which drops each answer from the batch (and its KV cache) once it has ended;
    ``loop="generate"`` calls ``policy.generate``, which computes every row until the longest
    answer ends. Both sample from the same distribution (temperature, top-k, top-p in transformers'
    order), from different random streams: the same ``seed`` gives different tokens in the two.

    Behavior logprobs are those of the raw model (temperature 1, no top-k/top-p), so they compare
    like for like with the trainer's logprobs. ``generate``'s are read while it runs
    (:class:`_RawLogprobs`), one step at a time, instead of asking it for every step's logits
    (``output_logits``, which keeps an [n, L, V] fp32 copy: 60 GB at the paper's shape) and a
    log-softmax of each.

    On a policy sharded over ranks (FSDP2) every decoding step all-gathers parameters, so every
    rank steps until all ranks' completions have ended (one all-reduce per step: the compact loop's
    own, or transformers' ``synced_gpus``); a rank whose completions ended first runs forwards that
    sample nothing, and their logits are not read as behaviour logprobs.

    Args:
        max_batch_size: rows (prompts x samples) decoded together; bounds memory.
        loop: ``"compact"`` (capo's loop) or ``"generate"`` (transformers').
    """

    shares_policy = True

    def __init__(self, max_batch_size: int = 64, loop: str = "compact") -> None:
        if max_batch_size < 1:
            raise ValueError(f"HFEngine max_batch_size must be >= 1, got {max_batch_size}")
        if loop not in LOOPS:
            raise ValueError(f"HFEngine loop must be one of {LOOPS}, got {loop!r}")
        self.max_batch_size = max_batch_size
        self.loop = loop
        self.policy: Any = None
        self.tokenizer: Any = None

    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig) -> list[Completion]:
        """Sample ``n`` completions per prompt, grouped by prompt."""
        if self.policy is None:
            raise RuntimeError("HFEngine.generate called before bind(policy, tokenizer)")
        if sampling.stop:
            raise ValueError(
                f"sampling.stop={sampling.stop} needs "
                "model.engine=capo_lightning.rollout.VLLMEngine; HFEngine stops at EOS only"
            )
        rows = [p for p in prompts for _ in range(n)]
        out: list[Completion] = []
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                if self.loop == "compact":  # one draw per row and step, fixed before any decodes
                    uniforms = torch.rand(sampling.max_new_tokens, len(rows), dtype=torch.float64)
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = rows[start : start + self.max_batch_size]
                    if self.loop == "compact":
                        drawn = uniforms[:, start : start + len(chunk)]
                        out.extend(self._decode_rows(chunk, sampling, drawn))
                    else:
                        out.extend(self._generate_rows(chunk, sampling))
        finally:
            self.policy.train(was_training)
        return out

    def _encode(self, rows: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ``input_ids`` [n, P] and ``attention_mask`` [n, P] on the policy's device."""
        enc = self.tokenizer(
            rows, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        device = next(self.policy.parameters()).device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def _decode_rows(
        self, rows: list[str], sampling: SamplingConfig, uniforms: Tensor
    ) -> list[Completion]:
        input_ids, attention_mask = self._encode(rows)
        synced = _sharded_over_ranks(self.policy)
        got = decode(
            self.policy, input_ids, attention_mask, sampling, self._eos_ids(), uniforms, synced
        )
        return [
            Completion(
                prompt_ids=input_ids[i][attention_mask[i].bool()].tolist(),
                token_ids=got.tokens[i],
                logprobs=got.logprobs[i],
                finish_reason=got.finish_reasons[i],
                text=self.tokenizer.decode(got.tokens[i], skip_special_tokens=True),
                sample_logprobs=got.sample_logprobs[i],
            )
            for i in range(len(rows))
        ]

    def _generate_rows(self, rows: list[str], sampling: SamplingConfig) -> list[Completion]:
        tok = self.tokenizer
        input_ids, attention_mask = self._encode(rows)  # [n, P] each
        greedy = sampling.temperature == 0
        synced = _sharded_over_ranks(self.policy)
        with _RawLogprobs(self.policy) as raw:
            sequences = self.policy.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else sampling.top_k,
                pad_token_id=tok.pad_token_id,
                eos_token_id=self._eos_ids(),
                synced_gpus=synced,
            )
        responses = sequences[:, input_ids.shape[1] :]  # [n, L]
        logprobs = raw.finish(responses, synced)  # [n, L]
        return [
            self._completion(
                input_ids[i][attention_mask[i].bool()], responses[i], logprobs[i], sampling
            )
            for i in range(len(rows))
        ]

    def _eos_ids(self) -> list[int]:
        ids = self.policy.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _completion(
        self, prompt_ids: Tensor, response: Tensor, logprobs: Tensor, sampling: SamplingConfig
    ) -> Completion:
        eos = torch.tensor(self._eos_ids(), device=response.device)
        is_eos = torch.isin(response, eos)  # [L]
        if bool(is_eos.any()):
            length = int(is_eos.nonzero()[0]) + 1
            reason = "stop"
        else:
            length = min(response.shape[0], sampling.max_new_tokens)
            reason = "length"
        ids = response[:length].tolist()
        return Completion(
            prompt_ids=prompt_ids.tolist(),
            token_ids=ids,
            logprobs=logprobs[:length].tolist(),
            finish_reason=reason,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
        )


def _sharded_over_ranks(policy: Any) -> bool:
    """True when ``policy`` is sharded (FSDP2) over more than one rank: its forwards are
    collective."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(transformers_model(policy), FSDPModule)


class _RawLogprobs:
    """log pi(a_t) under the raw logits of each decoding step, collected while ``generate`` runs.

    A hook on the LM head keeps the last position's logits of the current step and its
    log-normaliser; a hook on the model reads the token the step sampled from the next call's
    ``input_ids`` (with the KV cache, its last column), gathers that token's logprob and drops the
    logits. So one [n, V] block is alive at a time, and no [n, V] log-softmax is built.
    """

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.columns: list[Tensor] = []
        # (raw logits [n, V], logsumexp [n]) of the last step
        self.pending: tuple[Tensor, Tensor] | None = None

    def __enter__(self) -> _RawLogprobs:
        head = self.policy.get_output_embeddings()
        # on the transformers model itself: a PEFT wrapper's generate calls it directly
        self.handles = [
            transformers_model(self.policy).register_forward_pre_hook(
                self._next_call, with_kwargs=True
            ),
            head.register_forward_hook(self._logits),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _logits(self, _module: Any, _args: Any, output: Tensor) -> None:
        last = output[:, -1].float()  # [n, V]
        self.pending = (last, torch.logsumexp(last, dim=-1))

    def _next_call(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.pending is not None and ids is not None:
            self._settle(ids[:, -1])

    def _settle(self, tokens: Tensor) -> None:
        logits, norm = self.pending
        self.columns.append(logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - norm)  # [n]
        self.pending = None

    def finish(self, responses: Tensor, synced: bool = False) -> Tensor:
        """[n, L] logprobs of ``responses``, the tokens ``generate`` returned (the last one settled
        here). ``synced``: decoding may have gone on after this rank's completions ended (other
        ranks' had not), each step after the end a forward that sampled nothing: dropped."""
        length = responses.shape[1]
        if self.pending is not None and len(self.columns) < length:
            self._settle(responses[:, len(self.columns)])
        if synced:
            self.columns = self.columns[:length]
        if len(self.columns) != length:
            raise RuntimeError(
                f"HFEngine read {len(self.columns)} decoding steps for {responses.shape[1]} "
                "generated tokens; this model's generate does not call its LM head once per token"
            )
        return torch.stack(self.columns, dim=1)
