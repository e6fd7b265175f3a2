"""Rollouts with transformers ``generate`` on the policy object itself (the CPU default)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from capo_lightning.rollout.engine import Completion, RolloutEngine, SamplingConfig


class HFEngine(RolloutEngine):
    """Samples with ``policy.generate``; shares the policy, so weights are never stale.

    Behavior logprobs are those of the raw model (temperature 1, no top-k/top-p), read from the
    logits ``generate`` returns, so they compare like for like with the trainer's logprobs.

    Args:
        max_batch_size: rows (prompts x samples) per ``generate`` call; bounds memory.
    """

    shares_policy = True

    def __init__(self, max_batch_size: int = 64) -> None:
        if max_batch_size < 1:
            raise ValueError(f"HFEngine max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.policy: Any = None
        self.tokenizer: Any = None

    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig) -> list[Completion]:
        """Sample ``n`` completions per prompt, grouped by prompt."""
        if self.policy is None:
            raise RuntimeError("HFEngine.generate called before bind(policy, tokenizer)")
        if sampling.stop:
            raise ValueError(
                f"sampling.stop={sampling.stop} needs model.engine=capo_lightning.rollout.VLLMEngine; HFEngine "
                "stops at EOS only"
            )
        rows = [p for p in prompts for _ in range(n)]
        out: list[Completion] = []
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(rows), self.max_batch_size):
                    out.extend(self._generate_rows(rows[start : start + self.max_batch_size], sampling))
        finally:
            self.policy.train(was_training)
        return out

    def _generate_rows(self, rows: list[str], sampling: SamplingConfig) -> list[Completion]:
        tok = self.tokenizer
        enc = tok(rows, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        device = next(self.policy.parameters()).device
        input_ids = enc["input_ids"].to(device)  # [n, P]
        attention_mask = enc["attention_mask"].to(device)  # [n, P]
        greedy = sampling.temperature == 0
        gen = self.policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            pad_token_id=tok.pad_token_id,
            eos_token_id=self._eos_ids(),
            output_logits=True,
            return_dict_in_generate=True,
        )
        responses = gen.sequences[:, input_ids.shape[1] :]  # [n, L]
        logprobs = self._token_logprobs(gen.logits, responses)  # [n, L]
        return [
            self._completion(input_ids[i][attention_mask[i].bool()], responses[i], logprobs[i], sampling)
            for i in range(len(rows))
        ]

    def _eos_ids(self) -> list[int]:
        ids = self.policy.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @staticmethod
    def _token_logprobs(step_logits: tuple[Tensor, ...], responses: Tensor) -> Tensor:
        """Logprob of each generated token under the raw logits of its step -> [n, L]."""
        cols = []
        for j, logits in enumerate(step_logits):  # logits: [n, V]
            logp = torch.log_softmax(logits.float(), dim=-1)
            cols.append(logp.gather(1, responses[:, j : j + 1]))  # [n, 1]
        return torch.cat(cols, dim=1)

    def _completion(
        self, prompt_ids: Tensor, response: Tensor, logprobs: Tensor, sampling: SamplingConfig
    ) -> Completion:
        eos = torch.tensor(self._eos_ids(), device=response.device)
        is_eos = torch.isin(response, eos)  # [L]
        if bool(is_eos.any()):
            length = int(is_eos.nonzero()[0]) + 1
            reason = "stop"
        else:
            length = min(response.shape[0], sampling.max_new_tokens)
            reason = "length"
        ids = response[:length].tolist()
        return Completion(
            prompt_ids=prompt_ids.tolist(),
            token_ids=ids,
            logprobs=logprobs[:length].tolist(),
            finish_reason=reason,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
        )
