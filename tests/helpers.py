"""Small real components used by tests: a reward with variance on random models, a batch recorder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


def length_reward(completions: list[str], answers: list[str], **columns: Any) -> list[float]:
    """Reward = response length in characters / 10: varies within a group even for a random model,
    so advantages (and gradients) are non-zero in tests on the tiny model."""
    return [len(c) / 10.0 for c in completions]


class BatchRecorder(L.Callback):
    """Appends what each training batch contained, and when it was trained on, to a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        record = {
            "global_step": trainer.global_step,
            "policy_version": batch.policy_version,
            "rollout_step": batch.rollout_step,
            "prompts": batch.texts.prompts,
            "completions": batch.texts.completions,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records written by :class:`BatchRecorder`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class FixedBatches:
    """A sized iterable over ready-made batches: feeds the same rollouts to several runs."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _grpo():
    from capo_lightning.objectives import GRPO

    return GRPO


class RankOneNaNGRPO(_grpo()):
    """GRPO whose advantages are NaN on DDP rank 1 only: one rank's loss is non-finite."""

    def advantages(self, rewards, group_ids):
        import torch
        import torch.distributed as dist

        adv = super().advantages(rewards, group_ids)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() == 1:
            adv = torch.full_like(adv, float("nan"))
        return adv


class SGD:
    """Picklable optimizer factory (ddp_spawn pickles the module): plain SGD, update = -lr * grad.

    Tests of gradient equality use it because Adam's first step (~lr * sign(g)) hides scale errors.
    """

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __call__(self, params):
        import torch

        return torch.optim.SGD(params, lr=self.lr)


class RankBatches:
    """A sized iterable that yields ``per_rank[r]`` on DDP rank r (rank 0 when not distributed)."""

    def __init__(self, per_rank: list) -> None:
        self.per_rank = per_rank

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        import torch

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter([self.per_rank[rank]])
