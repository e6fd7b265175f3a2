"""Evaluation metrics for n sampled completions per problem: accuracy (mean@n), unbiased pass@k,
maj@n.

Each metric is a torchmetrics ``Metric`` whose states are a sum of per-problem values (float64) and
a problem count (int64), both reduced with ``dist_reduce_fx="sum"``: under DDP, ``compute()``
returns the mean over the problems of all ranks, however many each rank saw (not a mean of per-rank
means).

Legend: P problems in a batch, n sampled completions per problem, k the sample budget of pass@k.
``correct`` is ``[P, n]`` bool or 0/1 float; ``answer_keys`` holds P lists of n canonical answer
strings, None where no answer was extracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

AnswerKeys = Sequence[Sequence[str | None]]


def _as_bool(correct: Tensor) -> Tensor:
    """Validates ``correct`` ([P, n], n >= 1, bool or 0/1 values) and returns it as bool."""
    if correct.ndim != 2 or correct.shape[1] == 0:
        raise ValueError(f"correct must have shape [P, n] with n >= 1, got {tuple(correct.shape)}")
    if correct.dtype != torch.bool and not ((correct == 0) | (correct == 1)).all():
        raise ValueError("correct must be bool or hold only 0/1 values")
    return correct.bool()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator 1 - C(n-c, k) / C(n, k) of Chen et al. (2021).

    Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomial
    coefficients.

    Args:
        n: Samples drawn for the problem.
        c: How many of them are correct, 0 <= c <= n.
        k: Sample budget, 1 <= k <= n.

    Returns:
        The fraction of k-subsets of the n samples holding at least one correct sample; exactly 1.0
        when n - c < k (every k-subset does).

    Raises:
        ValueError: If k lies outside [1, n] or c outside [0, n].
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"the number of correct samples must lie in [0, n], got c={c}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_tensor(correct: Tensor, k: int) -> Tensor:
    """Vectorised :func:`pass_at_k` over problems.

    Args:
        correct: ``[P, n]`` bool or 0/1 correctness of each sample.
        k: Sample budget, 1 <= k <= n.

    Returns:
        ``[P]`` float64 pass@k of each problem (exactly 1.0 where n - c < k: the factor at i = k is
        0).
    """
    correct = _as_bool(correct)
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem, got k={k}, n={n}")
    c = correct.sum(dim=1, keepdim=True)  # [P, 1]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=correct.device)  # [n]
    factors = torch.where(i > n - c, 1.0 - k / i, torch.ones_like(i))  # [P, n]
    return 1.0 - factors.prod(dim=1)


def majority_correct(correct: Tensor, answer_keys: AnswerKeys) -> Tensor:
    """maj@n: whether the most frequent extracted answer of each problem is correct.

    None keys cast no vote; among equally frequent keys the one appearing first wins; the vote's
    correctness is that of the first sample carrying the winning key (samples with equal keys are
    graded alike); a problem without any extracted answer scores 0.

    Only maj@n is given: unlike pass@k, maj@k for k < n has no simple unbiased closed form (a
    k-subset's vote depends on its whole key multiset and on tie-breaking): it needs all C(n, k)
    subsets or a noisy subsample.

    Args:
        correct: ``[P, n]`` bool or 0/1 correctness of each sample.
        answer_keys: P lists of n canonical answer strings (None = no answer extracted).

    Returns:
        ``[P]`` float64, 1.0 where the majority answer is correct, else 0.0.
    """
    correct = _as_bool(correct)
    _check_keys(correct, answer_keys)
    out = []
    for flags, keys in zip(correct.tolist(), answer_keys):
        # key -> index of its first sample; insertion order = first occurrence
        first: dict[str, int] = {}
        votes: dict[str, int] = {}
        for j, key in enumerate(keys):
            if key is not None:
                first.setdefault(key, j)
                votes[key] = votes.get(key, 0) + 1
        # max() returns the first maximal key in iteration order, i.e. the earliest first occurrence
        out.append(float(flags[first[max(votes, key=votes.__getitem__)]]) if votes else 0.0)
    return torch.tensor(out, dtype=torch.float64, device=correct.device)


def _check_keys(correct: Tensor, answer_keys: AnswerKeys | None) -> None:
    p, n = correct.shape
    if answer_keys is None or len(answer_keys) != p or any(len(keys) != n for keys in answer_keys):
        raise ValueError(
            f"answer_keys must hold P={p} lists of n={n} keys, one per sample of correct"
        )


def default_ks(n: int) -> list[int]:
    """The pass@k budgets reported by default: powers of two <= n, plus n (n=6 -> [1, 2, 4, 6])."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return sorted({1 << e for e in range(n.bit_length())} | {n})


class _ProblemMean(Metric):
    """Mean over problems of a per-problem value; subclasses define ``_per_problem`` -> ``[P]``."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _per_problem(self, correct: Tensor, answer_keys: AnswerKeys | None) -> Tensor:
        raise NotImplementedError

    def update(self, correct: Tensor, answer_keys: AnswerKeys | None = None) -> None:
        """Adds a batch: ``correct`` ``[P, n]``; ``answer_keys`` (P lists of n) only used by
        maj@n."""
        values = self._per_problem(correct, answer_keys)  # [P]
        self.total += values.sum().to(self.total)
        self.count += values.numel()

    def compute(self) -> Tensor:
        """Mean over all problems seen (on all ranks); NaN before any update."""
        return self.total / self.count


class MeanAtK(_ProblemMean):
    """Accuracy, a.k.a. mean@n / avg@n: mean over problems of c/n."""

    def _per_problem(self, correct: Tensor, answer_keys: AnswerKeys | None) -> Tensor:
        return _as_bool(correct).double().mean(dim=1)


class PassAtK(_ProblemMean):
    """Mean over problems of the unbiased pass@k; an update with n < k raises ValueError."""

    def __init__(self, k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def _per_problem(self, correct: Tensor, answer_keys: AnswerKeys | None) -> Tensor:
        return pass_at_k_tensor(correct, self.k)


class MajorityAtK(_ProblemMean):
    """maj@n: mean over problems of :func:`majority_correct` (``answer_keys`` required)."""

    def _per_problem(self, correct: Tensor, answer_keys: AnswerKeys | None) -> Tensor:
        return majority_correct(correct, answer_keys)


class EvalMetrics(torch.nn.Module):
    """Accuracy, pass@k for each k in ``ks`` and maj@n, updated together.

    n is a plain attribute validated locally, not a synced state: every update must have the same n,
    taken from the constructor or else from the first update. Under DDP, pass ``n`` when a rank may
    see no batch, so that every rank can name the ``maj@{n}`` key. ``compute()`` already reduces
    across ranks:
    log its values without another ``sync_dist``.

    Args:
        ks: pass@k budgets; default ``default_ks(n)`` (then ``n`` is required).
        n: Samples per problem, if known up front.
    """

    def __init__(self, ks: Sequence[int] | None = None, n: int | None = None) -> None:
        super().__init__()
        if ks is None:
            if n is None:
                raise ValueError("EvalMetrics needs ks, or n to use ks = default_ks(n)")
            ks = default_ks(n)
        self.ks = sorted(set(ks))
        if not self.ks or (n is not None and not 1 <= self.ks[0] <= self.ks[-1] <= n):
            raise ValueError(f"every k must lie in [1, n], got ks={self.ks}, n={n}")
        self._fixed_n, self.n = n, n
        self.metrics = torch.nn.ModuleDict(
            {
                "accuracy": MeanAtK(),
                **{f"pass@{k}": PassAtK(k) for k in self.ks},
                "maj": MajorityAtK(),
            }
        )

    def update(self, correct: Tensor, answer_keys: AnswerKeys) -> None:
        """Adds a batch (``correct`` ``[P, n]``, P lists of n keys); all inputs are checked before
        any state moves."""
        n = _as_bool(correct).shape[1]
        _check_keys(correct, answer_keys)
        if self.n is not None and n != self.n:
            raise ValueError(f"every update must have n={self.n} samples per problem, got n={n}")
        if self.ks[-1] > n:
            raise ValueError(
                f"pass@{self.ks[-1]} needs k <= n samples per problem, got k={self.ks[-1]}, n={n}"
            )
        self.n = n
        for metric in self.metrics.values():
            metric.update(correct, answer_keys)

    def compute(self) -> dict[str, Tensor]:
        """``{"accuracy", "pass@{k}" for each k, "maj@{n}"}`` -> 0-dim float64 means over all
        problems."""
        if self.n is None:
            raise RuntimeError("EvalMetrics.compute() before any update: pass n to the constructor")
        out = {name: metric.compute() for name, metric in self.metrics.items()}
        out[f"maj@{self.n}"] = out.pop("maj")
        return out

    def reset(self) -> None:
        """Clears all states (and n, unless it was given to the constructor)."""
        for metric in self.metrics.values():
            metric.reset()
        self.n = self._fixed_n
