"""Rollout engines. Only ``vllm_engine.py`` may import vllm, and only lazily."""

from capo_lightning.rollout.engine import Completion, RolloutEngine, SamplingConfig
from capo_lightning.rollout.hf_engine import HFEngine
from capo_lightning.rollout.vllm_engine import VLLMEngine, WeightSyncError

__all__ = [
    "Completion",
    "HFEngine",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMEngine",
    "WeightSyncError",
]
