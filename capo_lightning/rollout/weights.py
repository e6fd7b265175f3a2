"""The weights an engine with its own copy of the model receives after each step
(:class:`VLLMEngine`).

:func:`merged_weights` streams (Hugging Face name, whole tensor) pairs one at a time: FSDP2 shards
are all-gathered as they are consumed, and a LoRA policy's adapters are merged on the fly, so the
engine serves a plain model while the trainer's model (and its bit-exact base) is never changed.
:func:`load_weights` is the engine worker's side of the stream; :func:`trainer_logprobs` the
trainer's side of the probe each sync is verified on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from capo_lightning.models.forward import score_responses
from capo_lightning.models.lora import is_lora, transformers_model
from capo_lightning.scale.parallel import full_tensor

__all__ = ["load_weights", "merged_weights", "trainer_logprobs"]


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, whole tensor) of ``model``'s weights with the adapters merged, as
    ``merge_and_unload`` would save them, computed one tensor at a time without changing ``model``
    (the base stays bit-exact).

    Sharded (FSDP2 DTensor) entries are all-gathered when consumed, in the same order on every rank.
    A model without adapters streams its own state dict. Each merged weight is
    ``W + scaling * B @ A`` summed over the active adapters, in float32 and cast back to ``W``'s
    dtype.
    """
    from peft.tuners.lora import LoraLayer

    if not is_lora(model):
        for name, tensor in model.state_dict().items():
            yield name, full_tensor(tensor.detach())
        return
    base = transformers_model(model)
    layers = {
        name + ".base_layer": layer
        for name, layer in base.named_modules()
        if isinstance(layer, LoraLayer)
    }
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:  # the adapters themselves: folded into their base layer's weight below
            continue
        owner, _, leaf = name.rpartition(".")
        value = full_tensor(tensor.detach())
        if owner not in layers:
            yield name, value
            continue
        if leaf == "weight":
            value = _merge(layers[owner], value)
        yield owner.removesuffix(".base_layer") + "." + leaf, value


def _merge(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` plus ``layer``'s active adapters' low-rank update (unless they are off or already
    merged)."""
    if layer.disable_adapters or layer.merged:
        return weight
    total = weight.float()
    for adapter in layer.active_adapters:
        # an embedding or convolution adapter: PEFT's own delta (unsharded only)
        if adapter not in layer.lora_A:
            total = total + layer.get_delta_weight(adapter).float()
            continue
        a = full_tensor(layer.lora_A[adapter].weight.detach()).float()
        b = full_tensor(layer.lora_B[adapter].weight.detach()).float()
        delta = (b @ a) * layer.scaling[adapter]
        total = total + (delta.T if layer.fan_in_fan_out else delta)
    return total.to(weight.dtype)


def load_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs on each vLLM worker: load HF-named tensors (a list, or a one-pass stream) into its
    model, in place.

    ``reload_weights`` (vLLM >= 0.30) re-runs the per-layer post-processing (repacking for CPU
    kernels, quantisation) that a plain ``model.load_weights`` after start-up would skip.
    """
    runner = worker.model_runner
    if hasattr(runner, "reload_weights"):
        runner.reload_weights(weights_iterator=iter(weights))
    else:
        runner.model.load_weights(weights=weights)


@torch.no_grad()
def trainer_logprobs(policy: Any, ids: list[int]) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t >= 1 -> [T - 1], through the trainer's own scoring pass."""
    input_ids = torch.tensor([ids], device=next(policy.parameters()).device)
    was_training = policy.training
    policy.eval()
    try:
        out = score_responses(
            policy, input_ids, torch.ones_like(input_ids, dtype=torch.bool), len(ids) - 1
        )
    finally:
        policy.train(was_training)
    return out.logprobs[0].cpu()
