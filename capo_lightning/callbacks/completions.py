"""A sample of what the policy wrote: prompts, completions, rewards and the selector's share of
rejections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from capo_lightning.training.result import StepResult, step_result

COLUMNS = [
    "step",
    "prompt",
    "completion",
    "answer",
    "reward",
    "advantage",
    "tokens",
    "rejected_share",
]


class CompletionsLog(Callback):
    """Every ``every_n_steps`` steps, records up to ``rows`` completions of the step (rank zero's).

    Each row: step, prompt, completion, gold answer, reward, advantage, response tokens and the
    share of its judged tokens the selector rejected (null without a selector, or when none of its
    tokens was judged, as a truncated completion under ``mask_truncated``). With a W&B logger the
    rows go to a W&B table ``completions`` (one per logging step); with any other logger they are
    appended to ``completions.jsonl`` in that logger's folder, next to ``metrics.csv``.

    Args:
        every_n_steps: steps between samples (optimizer steps, as the ``step`` column); 0 = never.
        rows: completions per sample (the first ones of the batch, in order: whole groups when a
            multiple of G).
        max_chars: prompts and completions are cut to this many characters.
    """

    def __init__(self, every_n_steps: int = 10, rows: int = 8, max_chars: int = 2000) -> None:
        if every_n_steps < 0 or rows < 1:
            raise ValueError(
                f"CompletionsLog needs every_n_steps >= 0 and rows >= 1, got {every_n_steps}, "
                f"{rows}"
            )
        self.every_n_steps, self.rows, self.max_chars = every_n_steps, rows, max_chars

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Write the sample on the steps it is due (rank zero)."""
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if getattr(batch, "texts", None) is None:
            return
        table = self.table(step, batch, step_result(outputs))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                data = [[row[c] for c in COLUMNS] for row in table]
                logger.log_table(key="completions", columns=COLUMNS, data=data, step=step)
            elif getattr(logger, "log_dir", None):
                Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
                with (Path(logger.log_dir) / "completions.jsonl").open("a") as f:
                    f.writelines(json.dumps(row) + "\n" for row in table)

    def table(self, step: int, batch: Any, result: StepResult | None) -> list[dict[str, Any]]:
        """The rows of one sample, as dicts keyed by :data:`COLUMNS`."""
        n = min(self.rows, batch.num_completions)
        texts = batch.texts
        advantages = result.advantages if result is not None else None
        selection = result.selection if result is not None else None
        shares = [None] * n
        if selection is not None and selection.judged is not None:
            judged = selection.judged[:n].sum(dim=1).float()  # [n]
            rejected = selection.rejected()[:n].sum(dim=1).float()
            # None: none judged
            shares = [r / j if j else None for r, j in zip(rejected.tolist(), judged.tolist())]
        tokens = batch.response_mask[:n].sum(dim=1).tolist()
        return [
            {
                "step": step,
                "prompt": texts.prompts[i][-self.max_chars :],
                "completion": texts.completions[i][: self.max_chars],
                "answer": texts.answers[i],
                "reward": float(batch.rewards[i]),
                "advantage": _advantage(advantages, batch.response_mask, i),
                "tokens": int(tokens[i]),
                "rejected_share": shares[i],
            }
            for i in range(n)
        ]


def _advantage(advantages: Any, response_mask: torch.Tensor, row: int) -> float | None:
    """The row's advantage; the mean over its tokens for token-level advantages [N, L]."""
    if not isinstance(advantages, torch.Tensor):
        return None
    if advantages.dim() == 1:
        return float(advantages[row])
    return float(advantages[row][response_mask[row]].float().mean())
