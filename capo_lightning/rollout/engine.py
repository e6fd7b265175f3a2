"""The rollout-engine contract: turn prompts into sampled completions with their logprobs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass
class SamplingConfig:
    """How completions are sampled. Defaults follow the CAPO paper's training runs."""

    max_new_tokens: int = 256
    """Response budget L; a completion that reaches it without EOS is marked truncated."""
    temperature: float = 0.9
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 50
    """Sample among the k most likely tokens (HF's default, which the paper's runs used); 0 disables
    it."""
    seed: int | None = None
    """Seed of the sampling RNG; the DataModule sets it per step so a resumed run samples the
    same."""
    stop: list[str] | None = None
    """Strings that end a completion (kept out of it); VLLMEngine only, HFEngine stops at EOS."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(
                f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Completion:
    """One sampled response to one prompt."""

    prompt_ids: list[int]  # [P_i] prompt token ids as the engine saw them
    token_ids: list[int]  # [L_i] response token ids, including the EOS token when it stopped
    # [L_i] log pi(token) of the engine's model at temperature 1, no top-k/top-p
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    text: str  # decoded response, special tokens removed
    # [L_i] log q(token) of the distribution it was drawn from (after temperature, top-k, top-p;
    # 0 when greedy); None where the engine does not report it
    sample_logprobs: list[float] | None = None


class RolloutEngine(ABC):
    """Generates completions from the current policy.

    ``bind`` is called by the module once the policy exists; ``sync_weights`` after every
    optimizer step. An engine that shares the policy object (``shares_policy``) has nothing to sync.
    """

    shares_policy: bool = False

    def bind(self, policy: Any, tokenizer: Any) -> None:
        """Attach the trainer's policy and tokenizer (called once, before the first rollout)."""
        self.policy = policy
        self.tokenizer = tokenizer

    @abstractmethod
    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig) -> list[Completion]:
        """Sample ``n`` completions for each prompt; returns len(prompts) * n, grouped by prompt."""

    def sync_weights(self, policy: Any, version: int) -> None:  # noqa: B027 (optional hook)
        """Make the engine generate from ``policy``'s current weights (no-op when shared)."""
