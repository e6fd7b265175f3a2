"""``capo export --ckpt_path PATH --out DIR``: the trained policy of a ``capo fit`` checkpoint as a
Hugging Face folder.

The folder is what ``save_pretrained`` writes (weights as safetensors, config, generation config)
plus the tokenizer with its chat template, so ``AutoModelForCausalLM.from_pretrained(DIR)`` loads
it, vLLM serves it and lighteval evaluates it. Which base model to build comes from the checkpoint
itself (the module stores its ``PolicySpec``); ``--policy`` names it for checkpoints written before
it did. A LoRA policy is written with its adapters merged into the base weights. A sharded FSDP2
checkpoint (a folder) is read directly, in one process, without its optimizer state.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from capo_lightning.models.lora import LoraSpec, is_lora, merged
from capo_lightning.models.policy import PolicySpec, load_policy

PREFIX = "policy."  # the policy's parameters in the LightningModule's state_dict


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, or an error naming the path and what is wrong with it."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(
            f"--ckpt_path {path}: no such file (a capo fit checkpoint, e.g. "
            "<run>/checkpoints/last.ckpt)"
        )
    try:
        if path.is_dir():
            checkpoint = _read_sharded(path)
        else:
            # the user's own checkpoint
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 (any unreadable file gets the same message)
        raise ValueError(
            f"--ckpt_path {path}: not a readable checkpoint ({type(error).__name__}: {error})"
        ) from error
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(key.startswith(PREFIX) for key in state):
        raise ValueError(
            f"--ckpt_path {path}: holds no policy weights (no 'policy.*' in its state_dict); not a "
            "capo fit checkpoint?"
        )
    return checkpoint


def _read_sharded(path: Path) -> dict[str, Any]:
    """A sharded FSDP2 checkpoint folder (``*.distcp`` shards + ``meta.pt``), read in this one
    process: the trainer state from ``meta.pt`` and only the model's ``state_dict`` from the shards
    (no optimizer state), each tensor whole, as the consolidated file would hold it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / "meta.pt").is_file() or not any(path.glob("*.distcp")):
        raise ValueError(
            "a folder, but not a sharded capo fit checkpoint (no meta.pt and *.distcp shards)"
        )
    checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    reader = dcp.FileSystemReader(str(path))
    state = {
        key.removeprefix("state_dict."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)
    }
    # "no process group: loading in a single process" is the intent here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"state_dict": state}, storage_reader=reader)
    checkpoint["state_dict"] = state
    return checkpoint


def policy_spec(
    checkpoint: dict[str, Any], override: str | None, ckpt_path: str | Path
) -> PolicySpec:
    """The PolicySpec the checkpoint was trained from (``--policy`` replaces its name_or_path)."""
    stored = checkpoint.get("capo_state", {}).get("policy")
    if stored is None and override is None:
        raise ValueError(
            f"--ckpt_path {ckpt_path} does not say which base model it trained (written before "
            "capo stored it): pass --policy NAME_OR_PATH, the run's model.policy.name_or_path"
        )
    if stored is not None and isinstance(stored.get("lora"), dict):
        stored = {**stored, "lora": LoraSpec(**stored["lora"])}
    spec = PolicySpec(**stored) if stored is not None else PolicySpec()
    return dataclasses.replace(spec, name_or_path=override) if override is not None else spec


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, policy: str | None = None
) -> Path:
    """Write the checkpoint's policy (weights, config, generation config, tokenizer) to ``out_dir``.

    Args:
        ckpt_path: a Lightning checkpoint of ``capo fit``: one file, or the folder a sharded FSDP2
            run writes.
        out_dir: the folder to write (created).
        policy: the base model's name_or_path, for checkpoints that do not store it.
    """
    checkpoint = read_checkpoint(ckpt_path)
    spec = policy_spec(checkpoint, policy, ckpt_path)
    model, tokenizer = load_policy(dataclasses.replace(spec, gradient_checkpointing=False))
    weights = {
        key[len(PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(PREFIX)
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    frozen = (
        {name for name, param in model.named_parameters() if not param.requires_grad}
        if is_lora(model)
        else set()
    )
    # LoRA: the base's own weights
    missing = [name for name in missing if name not in tied and name not in frozen]
    if missing or unexpected:
        raise ValueError(
            f"--ckpt_path {ckpt_path}: its policy weights do not fit {spec.name_or_path} (missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}); pass the run's base model with --policy"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = merged(model)  # LoRA: adapters folded into the base weights, a plain transformers model
    model.config.use_cache = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``capo export --ckpt_path PATH --out DIR [--policy NAME_OR_PATH]``; errors exit with status 2
    and a message."""
    parser = argparse.ArgumentParser(prog="capo export", description=__doc__.split("\n\n")[0])
    where = (
        "a capo fit checkpoint: a file (runs/x/checkpoints/last.ckpt) or an FSDP2 run's "
        "sharded folder"
    )
    parser.add_argument("--ckpt_path", required=True, help=where)
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument(
        "--policy", default=None, help="the base model, for checkpoints that do not store it"
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt_path, args.out, args.policy)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(
        f"capo export: {args.ckpt_path} -> {out} (AutoModelForCausalLM.from_pretrained('{out}') "
        "loads it)"
    )
