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


def make_trainer(max_steps: int = 1, callbacks: list | None = None, **kwargs: Any) -> L.Trainer:
    """A quiet single-process CPU Trainer with no logger and no checkpoints; ``kwargs`` override."""
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )
    settings.update(kwargs)
    return L.Trainer(**settings)


def tiny_rollout(
    model_dir: Path | str,
    num_prompts: int,
    group_size: int = 4,
    max_new_tokens: int = 12,
    temperature: float = 1.0,
    seed: int = 3,
    reward_fn: Any = length_reward,
) -> Any:
    """One real RolloutBatch sampled from the fresh tiny policy (arithmetic prompts, seed 1, values <= 20)."""
    from capo_lightning.data.datamodule import RolloutDataModule
    from capo_lightning.data.prompts import ArithmeticSource
    from capo_lightning.models.policy import PolicySpec
    from capo_lightning.module import CAPOModule
    from capo_lightning.rollout import SamplingConfig

    dm = RolloutDataModule(
        train_source=ArithmeticSource(seed=1, max_value=20),
        prompts_per_step=num_prompts,
        group_size=group_size,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0),
        reward_fn=reward_fn,
        max_prompt_tokens=96,
    )
    gen = CAPOModule(policy=PolicySpec(str(model_dir)))
    gen.configure_model()
    dm.connect(gen.engine, gen.tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return dm.rollout([dm.train_source.item(i) for i in range(num_prompts)], group_size, sampling, 0, 0)


def multiple_of_three(completions: list[str], answers: list[str], **columns: Any) -> list[float]:
    """A grader that ignores the text: correct iff the gold answer is a multiple of 3 (picklable for spawn)."""
    return [float(int(a) % 3 == 0) for a in answers]


class SelectionRecorder(L.Callback):
    """Saves each step's selection, rewards and advantages on every rank to ``<folder>/rank<r>_step<s>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        import torch

        from capo_lightning.training.result import step_result

        step = step_result(outputs)
        selection = step.selection
        record = {
            "judged": selection.judged.cpu() if selection.judged is not None else None,
            "failed": {k: v.cpu() for k, v in selection.failed.items()},
            "token_mask": selection.token_mask.cpu(),
            "shifts": {k: v.detach().cpu() for k, v in selection.shifts.items()},
            "rewards": batch.rewards.cpu(),
            "advantages": step.advantages.cpu(),
            "completions": list(batch.texts.completions) if batch.texts is not None else None,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.folder / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")


def read_csv_metrics(log_dir: str | Path) -> list[dict[str, float]]:
    """Rows of the CSV logger's metrics.csv under ``log_dir`` (any version), empty cells left out."""
    import csv

    (path,) = sorted(Path(log_dir).rglob("metrics.csv"))[-1:]
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def tiny_datamodule(**overrides: Any) -> Any:
    """The tests' rollout DataModule: 2 arithmetic prompts (seed 1, values <= 20) x 4 samples of <= 12 tokens,
    length rewards; ``overrides`` replace or add constructor arguments."""
    from capo_lightning.data.datamodule import RolloutDataModule
    from capo_lightning.data.prompts import ArithmeticSource
    from capo_lightning.rollout import SamplingConfig

    kwargs: dict[str, Any] = dict(
        train_source=ArithmeticSource(seed=1, max_value=20),
        prompts_per_step=2,
        group_size=4,
        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0),
        reward_fn=length_reward,
        max_prompt_tokens=96,
    )
    kwargs.update(overrides)
    return RolloutDataModule(**kwargs)


# every collapse-detector signal switched off; tests switch on the one they watch
SIGNALS_OFF = dict(
    reward_drop=None, entropy_ratio=None, entropy_rise=None, truncated_max=None, min_length=None, grad_spike=None,
    reject_max=None,
)  # fmt: skip


def _rollout_engine():
    from capo_lightning.rollout.engine import RolloutEngine

    return RolloutEngine


class ScriptedEngine(_rollout_engine()):
    """Completions that depend only on the prompt's text and the sample's index, never on the weights, the rank or
    the step's seed: two ranks with half of a step's prompts each make the batch one process makes with all of them
    (``tests/integration/test_launch.py`` trains through the real CLI on it). Each completion is 1..max_new_tokens
    random non-special tokens seeded by a stable hash, so lengths, and length rewards, vary within a group.

    ``record_dir``: at ``bind``, where the module binds a vLLM engine too, each rank writes ``rank<r>.json``: the
    rank variables vLLM's external launcher reads, as this process's environment holds them then, the stamp its run
    folder was named with (``CAPO_RUN_STAMP``), and the process group's rank and size."""

    def __init__(self, record_dir: str | None = None) -> None:
        self.record_dir = record_dir

    def bind(self, policy: Any, tokenizer: Any) -> None:
        import os

        import torch.distributed as dist

        from capo_lightning.scale.launch import RANK_VARIABLES, STAMP_VARIABLE

        super().bind(policy, tokenizer)
        if self.record_dir is None:
            return
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        record = {name: os.environ.get(name) for name in (*RANK_VARIABLES, STAMP_VARIABLE)}
        record["process_group"] = [rank, world]
        Path(self.record_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.record_dir) / f"rank{rank}.json").write_text(json.dumps(record))

    def generate(self, prompts: list[str], n: int, sampling: Any) -> list[Any]:
        import math
        import zlib

        import torch

        from capo_lightning.rollout.engine import Completion

        special = set(self.tokenizer.all_special_ids)
        vocab = [i for i in range(len(self.tokenizer)) if i not in special]
        completions = []
        for prompt in prompts:
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for j in range(n):
                generator = torch.Generator().manual_seed(zlib.crc32(f"{j}|{prompt}".encode()))
                length = int(torch.randint(1, sampling.max_new_tokens + 1, (1,), generator=generator))
                ids = [vocab[k] for k in torch.randint(len(vocab), (length,), generator=generator).tolist()]
                reason = "length" if length == sampling.max_new_tokens else "stop"
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(Completion(prompt_ids, ids, [-math.log(len(vocab))] * length, reason, text))
        return completions
