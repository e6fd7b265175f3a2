"""Shared fixtures: offline environment, a tiny real transformers model built locally, batch factories."""

from __future__ import annotations

import importlib.util
import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from capo_lightning.models.tiny import build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# tests/vllm needs vllm (the .venv-vllm environment); elsewhere it is not collected at all, not skipped
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["vllm/*"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/gpu is marked ``gpu``, under tests/vllm ``vllm``."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "gpu" in parts:
            item.add_marker(pytest.mark.gpu)
        if "vllm" in parts:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2 with a locally trained BPE tokenizer, written with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)
