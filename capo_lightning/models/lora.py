"""LoRA policies through PEFT: the spec, applying it at load time, the adapters-off reference,
merging for export.

With LoRA the frozen base is the reference model for free: the policy with its adapters switched off
(:func:`adapters_off`) scores exactly as the base model, so a KL-regularised run holds one model,
not two. The LM head is frozen by default; ``train_head`` makes its weight trainable in place (a
plain ``nn.Linear`` still, so scoring stays memory-bounded and CAPO's curvature model, which is
about the head's update, applies). With tied embeddings that weight is the input embedding too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """Low-rank adapters on the policy's linear layers (``model.policy.lora``).

    ``model.policy.lora: null`` (the default) is full fine-tuning."""

    rank: int = 16
    """r, the adapters' rank."""

    alpha: float = 32.0
    """lora_alpha; the update is scaled by alpha / rank."""

    dropout: float = 0.0
    """Dropout on the adapters' input (0 keeps the ratio exactly 1 with ppo_epochs = minibatches =
    1)."""

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Names of the linear layers that get adapters (Llama/Qwen2 attention and MLP projections by
    default)."""

    train_head: bool = False
    """Also train the LM head's weight (needed by CAPO, whose curvature model is the head's
    update)."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(
                "model.policy.lora needs rank >= 1, alpha > 0, 0 <= dropout < 1 and some "
                f"target_modules; got rank={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout}, target_modules={self.target_modules}"
            )


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """The PEFT model with ``spec``'s adapters; only adapters (and the head, if ``train_head``)
    require grad."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if spec.train_head:
        peft_model.get_output_embeddings().weight.requires_grad_(True)
    return peft_model


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model itself: inside a PEFT wrapper (whose ``generate`` calls it directly),
    else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (adapters attached)."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model`` scores as its base model (a no-op for a model without
    adapters)."""
    if not is_lora(model):
        yield model
        return
    with model.disable_adapter():
        yield model


def merged(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters merged into the base weights (``model`` is
    changed)."""
    return model.merge_and_unload() if is_lora(model) else model


def check_lora(policy: nn.Module, selector: nn.Module | None) -> None:
    """Refuse the combinations LoRA does not support, naming the fix."""
    if not is_lora(policy):
        return
    if selector is not None and getattr(selector, "needs_hidden", False):
        if not policy.get_output_embeddings().weight.requires_grad:
            raise ValueError(
                "model.selector is CAPO, whose curvature model predicts the LM head's update, but "
                "with model.policy.lora the head is frozen (no such update happens): set "
                "model.policy.lora.train_head=true"
            )


def drop_frozen(state_dict: dict, policy: nn.Module, prefix: str = "policy.") -> None:
    """Remove a LoRA policy's frozen base weights from a checkpoint's ``state_dict`` (they are
    rebuilt from the base model on load); a full fine-tuning policy keeps everything.

    A sharded (FSDP2) checkpoint keeps them too: Lightning's sharded loader asks the shards for the
    whole model state and fails on any key they lack. Each rank then writes its share of the base,
    1/world of it. (Sharded = DTensor entries, told apart
    as :func:`capo_lightning.scale.parallel.full_tensor` does, by ``full_tensor``.)"""
    if not is_lora(policy) or any(hasattr(value, "full_tensor") for value in state_dict.values()):
        return
    trained = {
        prefix + name
        for name, param in policy.named_parameters(remove_duplicate=False)
        if param.requires_grad
    }
    for key in [k for k in state_dict if k.startswith(prefix) and k not in trained]:
        # frozen weights (a tied head under both names) and buffers: rebuilt on load
        del state_dict[key]
