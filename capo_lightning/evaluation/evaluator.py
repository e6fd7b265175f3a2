"""Per-dataset evaluation state of one validation or test epoch.

Each eval batch holds P problems with n completions each, graded 0/1 by the DataModule's
``eval_reward_fn``. :class:`Evaluator` feeds them to rank-synchronised torchmetrics
(:mod:`capo_lightning.evaluation.metrics`) and returns, per dataset ``ds``:

* ``{stage}/{ds}/accuracy`` (mean@n), ``{stage}/{ds}/pass@k`` (unbiased, k = 1, 2, 4, ..., n),
  ``{stage}/{ds}/maj@n`` (majority vote over the n extracted answers);
* ``{stage}/accuracy``: the mean of the datasets' accuracies (what to monitor for checkpoints).

Per-batch side metrics (response length, truncation, verifier health) are returned by
:meth:`Evaluator.batch_metrics` for ``self.log(..., on_epoch=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from capo_lightning import keys
from capo_lightning.batch import RolloutBatch
from capo_lightning.evaluation.metrics import EvalMetrics
from capo_lightning.rewards.math import answer_key


class Evaluator:
    """Metric state for the datasets of one stage.

    Args:
        stage: ``val`` or ``test``, the key prefix.
        names: dataset names, in dataloader order.
        n: completions per problem.
        device: where the metric states live (the module's device, for rank sync).
    """

    def __init__(self, stage: str, names: list[str], n: int, device: torch.device) -> None:
        self.stage, self.names, self.n = stage, list(names) or ["default"], n
        # n given up front: a rank that saw no batch of a set can still compute (and sync) its
        # metrics
        self.metrics = {name: EvalMetrics(n=n).to(device) for name in self.names}

    def update(self, batch: RolloutBatch, dataloader_idx: int = 0) -> None:
        """Add the batch's problems; padding problems (``stats["eval/valid_prompts"]``) are left
        out."""
        groups = batch.num_completions // self.n
        valid = int(batch.stats.get(keys.VALID_PROMPTS, groups))
        correct = (batch.rewards > 0.5).view(groups, self.n)[:valid]  # [P, n]
        texts = batch.texts.completions if batch.texts is not None else [""] * batch.num_completions
        answers = [[answer_key(texts[p * self.n + j]) for j in range(self.n)] for p in range(valid)]
        self.metrics[self.names[dataloader_idx]].update(correct, answers)

    def batch_metrics(self, batch: RolloutBatch, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Response length, truncation and the grader's ``verifier/*`` stats of one batch."""
        name = self.names[dataloader_idx]
        out = {
            keys.evaluation(self.stage, "response_length_mean", name): batch.response_mask.sum(1)
            .float()
            .mean(),
            keys.evaluation(self.stage, "truncated_frac", name): batch.truncated.float().mean(),
        }
        for key, value in batch.stats.items():
            if key.startswith(keys.VERIFIER):
                metric = key.removeprefix(keys.VERIFIER)
                out[keys.evaluation(self.stage, metric, name)] = torch.tensor(
                    float(value), dtype=torch.float32
                )
        return out

    def compute(self) -> dict[str, Tensor]:
        """Every dataset's metrics (synchronised across ranks) and the mean accuracy."""
        out: dict[str, Tensor] = {}
        for name, metrics in self.metrics.items():
            out.update(
                {
                    keys.evaluation(self.stage, key, name): value
                    for key, value in metrics.compute().items()
                }
            )
        accuracies = [out[keys.evaluation(self.stage, "accuracy", name)] for name in self.names]
        out[keys.evaluation(self.stage, "accuracy")] = torch.stack(
            [a.float() for a in accuracies]
        ).mean()
        return out

    def summary(self, results: dict[str, Tensor], step: int) -> str:
        """A plain-text table of ``results`` (from :meth:`compute`): one row per dataset."""
        ks = self.metrics[self.names[0]].ks
        columns = ["accuracy", *[f"pass@{k}" for k in ks], f"maj@{self.n}"]
        width = max(len(name) for name in self.names) + 2
        lines = [
            f"{self.stage} at step {step}: {self.n} samples per problem",
            "set".ljust(width) + "".join(c.rjust(10) for c in columns),
        ]
        for name in self.names:
            values = [float(results[f"{self.stage}/{name}/{c}"]) for c in columns]
            lines.append(name.ljust(width) + "".join(f"{v:10.4f}" for v in values))
        lines.append(
            "mean accuracy".ljust(width) + f"{float(results[f'{self.stage}/accuracy']):10.4f}"
        )
        return "\n".join(lines)
