"""HFEngine's decoding loop: sampling that stops computing an answer once it has ended.

transformers ``generate`` keeps every row of a batch in every forward until the longest answer
ends (finished rows are fed padding). This loop drops a row from the batch, its KV cache included,
on the step its EOS is sampled, so a batch of mostly short answers stops paying for the long ones.

The distribution sampled from is ``generate``'s: the raw logits divided by the temperature, then
top-k (ties at the k-th value kept), then top-p (the smallest set of most likely tokens holding
``top_p`` of the mass, at least one), in transformers' (and vLLM's) order (:func:`sampling_scores`).
The draw is by inverse CDF with one uniform per row and step from an [L, n] table drawn up front, so
a row's tokens depend on its own uniforms only, never on which other rows are still in the batch, on
``max_batch_size`` or on the device (the table is drawn on the CPU). Greedy decoding (temperature
0) takes the arg-max of the raw logits.

Each sampled token carries two log-probabilities: the raw model's (temperature 1, nothing cut),
the behaviour logprobs the trainer's ratio compares with its own raw scoring; and the processed
distribution's, the one the token was actually drawn from (0 when greedy), which an importance
weight against a lagging batch needs.

On a policy sharded over ranks (FSDP2) every forward is collective: each step the ranks agree
(one all-reduce) whether any rank still has an unfinished row, and a rank whose rows have all ended
keeps one of them in the batch and runs its forwards without reading them (``generate``'s
``synced_gpus``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from capo_lightning.models.forward import position_ids_from_mask
from capo_lightning.models.lora import transformers_model
from capo_lightning.rollout.engine import SamplingConfig


def sampling_scores(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """[n, V] scores whose softmax is the distribution sampled from: ``logits`` [n, V] (fp32)
    divided by the temperature, then top-k, then top-p; -inf outside the kept set."""
    scores = logits / sampling.temperature if sampling.temperature != 1.0 else logits
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[:, -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if sampling.top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        below = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p  # [n, V]
        below[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(below.scatter(1, order, below), -math.inf)
    return scores


def draw(probs: Tensor, uniforms: Tensor) -> Tensor:
    """[n] token ids drawn from ``probs`` [n, V] by inverse CDF with ``uniforms`` [n] in [0, 1):
    the first id whose cumulative probability (fp64, vocabulary order) exceeds u times the total.
    A token of probability 0 is never drawn."""
    cdf = probs.double().cumsum(dim=-1)  # [n, V]
    target = uniforms.to(cdf) * cdf[:, -1]
    ids = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    ids = ids.clamp(max=probs.shape[-1] - 1)
    empty = probs.gather(1, ids.unsqueeze(1)).squeeze(1) == 0  # only where u * total rounds up
    if bool(empty.any()):
        last = probs.shape[-1] - 1 - (probs[empty] > 0).flip(-1).int().argmax(dim=-1)
        ids[empty] = last
    return ids


@dataclass
class Decoded:
    """What :func:`decode` returns, one list per row of its input, in input order."""

    tokens: list[list[int]]  # EOS included when it stopped
    logprobs: list[list[float]]  # raw model, temperature 1
    sample_logprobs: list[list[float]]  # the distribution each token was drawn from
    finish_reasons: list[str]  # "stop" (EOS) or "length"


def decode(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    sampling: SamplingConfig,
    eos_ids: list[int],
    uniforms: Tensor,
    synced: bool = False,
) -> Decoded:
    """Sample a response for each row of the left-padded ``input_ids`` [n, P].

    ``uniforms`` [max_new_tokens, n]: row i's draw at step t uses ``uniforms[t, i]``. ``synced``:
    the model's forwards are collective over ranks (see the module docstring).
    """
    n = input_ids.shape[0]
    device = input_ids.device
    greedy = sampling.temperature == 0
    eos = torch.tensor(eos_ids, device=device)
    uniforms = uniforms.to(device)
    rows = torch.arange(n, device=device)  # input row of each batch row
    live = torch.ones(n, dtype=torch.bool, device=device)  # False: a row kept only for lockstep
    steps: list[tuple[Tensor, ...]] = []  # per step: (rows, tokens, raw, sampled) of live rows
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    positions = position_ids_from_mask(attention_mask)
    cache_kw = _cache_keyword(model)
    step_out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, positions = getattr(step_out, cache_kw), positions[:, -1:] + 1
    for t in range(sampling.max_new_tokens):
        logits = step_out.logits[:, -1].float()  # [m, V]
        tokens, raw, sampled = _pick(logits, sampling, greedy, uniforms[t, rows])
        steps.append((rows[live], tokens[live], raw[live], sampled[live]))
        ended = live & torch.isin(tokens, eos)
        stopped[rows[ended]] = True
        live &= ~ended
        if t + 1 == sampling.max_new_tokens or not _any_rank(bool(live.any()), synced, device):
            break
        keep = live.nonzero().squeeze(1)
        if keep.numel() == 0:  # synced: this rank's rows have ended, another rank's have not
            keep = torch.zeros(1, dtype=torch.long, device=device)
        if keep.numel() < rows.numel():
            cache.batch_select_indices(keep)
            rows, live, tokens = rows[keep], live[keep], tokens[keep]
            attention_mask, positions = attention_mask[keep], positions[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        step_out = model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        positions = positions + 1
    return _collect(steps, stopped.tolist())


def _collect(steps: list[tuple[Tensor, ...]], stopped: list[bool]) -> Decoded:
    """Each step's (rows, tokens, raw, sampled) appended to its rows' lists, in step order."""
    out = Decoded(
        tokens=[[] for _ in stopped],
        logprobs=[[] for _ in stopped],
        sample_logprobs=[[] for _ in stopped],
        finish_reasons=["stop" if s else "length" for s in stopped],
    )
    rows, tokens, raw, sampled = (torch.cat(part).tolist() for part in zip(*steps, strict=True))
    for row, token, lp, slp in zip(rows, tokens, raw, sampled, strict=True):
        out.tokens[row].append(token)
        out.logprobs[row].append(lp)
        out.sample_logprobs[row].append(slp)
    return out


def _pick(
    logits: Tensor, sampling: SamplingConfig, greedy: bool, uniforms: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [m], raw logprobs [m], logprobs of the distribution drawn from [m]) of one step."""
    norm = torch.logsumexp(logits, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1)
        sampled = torch.zeros_like(norm)
    else:
        scores = sampling_scores(logits, sampling)
        log_q = scores.log_softmax(dim=-1)
        tokens = draw(log_q.exp(), uniforms)
        sampled = log_q.gather(1, tokens.unsqueeze(1)).squeeze(1)
    raw = logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - norm
    return tokens, raw, sampled


def _cache_keyword(model: Any) -> str:
    """The forward's (and its output's) name for the KV cache: ``cache`` from transformers 5.24
    (which deprecates ``past_key_values``), ``past_key_values`` before."""
    forward = transformers_model(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _any_rank(flag: bool, synced: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (this rank's ``flag`` when not ``synced``); the
    all-reduce runs on ``device``, the policy's (CUDA under NCCL)."""
    if not synced:
        return flag
    anywhere = torch.tensor([float(flag)], device=device)
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    return bool(anywhere.item() > 0)
