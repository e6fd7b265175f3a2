"""Putting the policy (and the frozen KL reference) on this rank: model files built once per node,
and under FSDP2 the weights read once, by rank 0, and handed out as shards.

The plain path (one process, DDP, or FSDP2 with ``rank0_loading=False``) loads the whole model on
every rank (``from_pretrained``) and deep-copies it for the reference; FSDP2 then shards both. Its
peak host memory is the whole model per rank (twice with a reference): ~30 GB a rank at 7B fp32.

The rank-0 path (FSDP2 over several ranks, the default): every rank builds the architecture on the
meta device (:func:`.models.policy.policy_skeleton`: no storage), shards it, and allocates only its
own shard on its device; rank 0 alone loads the weights (``from_pretrained`` on the host) and
broadcasts them one tensor at a time, each rank keeping its shard (``set_model_state_dict`` with
``broadcast_from_rank0``). What meta initialisation loses is restored here:

- buffers, the non-persistent rotary ``inv_freq`` included (no state dict holds it), are
  broadcast from rank 0's loaded model;
- tied embeddings stay one parameter: FSDP2 shards a shared parameter once, and ``to_empty`` on a
  sharded module keeps it shared (tests check the tie and the logits);
- the reference is a deep copy of the skeleton, sharded the same way and filled from the policy's
  local shards (no second broadcast);
- a LoRA policy is its own reference; its adapters travel with the base weights, so every rank
  starts from rank 0's adapter initialisation.

Model files: where a name must be built first (the bundled GGUF is converted, ~35 s; a tiny model is
generated), each node's local rank 0 builds it while the other ranks wait at a barrier, then they
find it in the cache (a cache shared by several nodes is built by one node's rank 0 and reused by
the others; two nodes racing on a cold shared cache both build, and the atomic rename keeps one).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from capo_lightning.models.lora import is_lora
from capo_lightning.models.policy import PolicySpec, load_policy, policy_skeleton, resolve_model_dir
from capo_lightning.scale.launch import export_rank_environment
from capo_lightning.scale.parallel import FSDP2Strategy

Models = tuple[nn.Module, Any, nn.Module | None]
"""(policy, tokenizer, reference or None); a LoRA policy is its own reference."""


def build_models(spec: PolicySpec, trainer: Any, needs_reference: bool) -> Models:
    """The policy, its tokenizer and the frozen reference (when ``needs_reference``), ready for the
    trainer's strategy: refuses ``16-true``, puts this rank's launch variables in the environment
    for vLLM (:func:`.launch.export_rank_environment`) and shards under :class:`FSDP2Strategy`."""
    _refuse_fp16_weights(trainer)
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    export_rank_environment(strategy)
    _model_files_once_per_node(spec, strategy)
    if isinstance(strategy, FSDP2Strategy) and strategy.rank0_loading and strategy.world_size > 1:
        return _sharded_from_rank0(spec, strategy, needs_reference)
    policy, tokenizer = load_policy(spec)
    reference = _reference_of(policy, needs_reference)
    if isinstance(strategy, FSDP2Strategy):
        for model in _distinct(policy, reference):
            strategy.shard(model)
    return policy, tokenizer, reference


def _sharded_from_rank0(spec: PolicySpec, strategy: FSDP2Strategy, needs_reference: bool) -> Models:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    loaded = load_policy(spec)[0] if strategy.global_rank == 0 else None
    policy, tokenizer = policy_skeleton(spec)
    reference = _reference_of(policy, needs_reference)
    for model in _distinct(policy, reference):
        strategy.shard(model).to_empty(device=strategy.root_device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, loaded.state_dict() if loaded is not None else {}, options=options)
    _broadcast_buffers(policy, loaded)
    del loaded
    if reference is not None and reference is not policy:
        _copy_local(reference, policy)
    return policy, tokenizer, reference


def _broadcast_buffers(model: nn.Module, loaded: nn.Module | None) -> None:
    """Every buffer of ``model`` set to rank 0's ``loaded`` one (buffers are not sharded)."""
    import torch.distributed as dist

    source = dict(loaded.named_buffers()) if loaded is not None else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if loaded is not None:
                buffer.copy_(source[name])
            dist.broadcast(buffer, src=0)


def _copy_local(target: nn.Module, source: nn.Module) -> None:
    """``target`` (a copy of ``source``'s architecture, sharded the same way) takes its values: each
    rank copies its own shards, no communication."""
    with torch.no_grad():
        for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
            mine.copy_(theirs)
        for mine, theirs in zip(target.buffers(), source.buffers(), strict=True):
            mine.copy_(theirs)


def _reference_of(policy: nn.Module, needs_reference: bool) -> nn.Module | None:
    """A frozen copy of the policy, or the policy itself when it is LoRA (scored with its adapters
    off); None without a KL term."""
    if not needs_reference:
        return None
    if is_lora(policy):
        return policy
    return copy.deepcopy(policy).requires_grad_(False).eval()


def _distinct(*models: nn.Module | None) -> list[nn.Module]:
    out: list[nn.Module] = []
    for model in models:
        if model is not None and all(model is not seen for seen in out):
            out.append(model)
    return out


def _model_files_once_per_node(spec: PolicySpec, strategy: Any) -> None:
    """Each node's local rank 0 resolves (builds, if need be) the model files before the others."""
    if strategy is None or getattr(strategy, "world_size", 1) <= 1:
        return
    if strategy.local_rank == 0:
        resolve_model_dir(spec)
    strategy.barrier("capo-model-files")


def _refuse_fp16_weights(trainer: Any) -> None:
    precision = str(getattr(trainer, "precision", ""))
    if precision in ("16-true", "16"):
        raise ValueError(
            f"trainer.precision={precision} trains fp16 weights without loss scaling: sampling "
            "overflows and small updates vanish; use 16-mixed (fp16 autocast with a grad scaler), "
            "bf16-mixed or bf16-true"
        )
