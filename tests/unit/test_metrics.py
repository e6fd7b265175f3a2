"""Tests for capo_lightning.evaluation.metrics: pass@k against enumeration, maj@n by hand, accumulation, DDP sync."""

from __future__ import annotations

import datetime
import itertools
import math
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from capo_lightning.evaluation.metrics import (
    EvalMetrics,
    MajorityAtK,
    MeanAtK,
    PassAtK,
    default_ks,
    majority_correct,
    pass_at_k,
    pass_at_k_tensor,
)

# ---- pass@k ------------------------------------------------------------------------------------------------


def _enumerated_pass_at_k(flags: list[int], k: int) -> float:
    """Fraction of the k-subsets of ``flags`` that hold at least one correct sample."""
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_subset_enumeration(n: int) -> None:
    rng = random.Random(n)
    for c in range(n + 1):
        flags = [1] * c + [0] * (n - c)
        rng.shuffle(flags)
        for k in range(1, n + 1):
            brute = _enumerated_pass_at_k(flags, k)
            comb_form = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(comb_form, abs=1e-12)
            if n - c < k:
                assert pass_at_k(n, c, k) == 1.0


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_tensor_matches_scalar(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    rows = [torch.randperm(n, generator=g) < c for c in range(n + 1)]  # row c has c correct samples, shuffled
    correct = torch.stack(rows)  # [n+1, n]
    for k in range(1, n + 1):
        got = pass_at_k_tensor(correct, k)
        assert got.dtype == torch.float64 and got.shape == (n + 1,)
        expected = torch.tensor([_enumerated_pass_at_k(r.int().tolist(), k) for r in rows], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(pass_at_k_tensor(correct.float(), k), got)  # 0/1 floats accepted


def test_pass_at_k_stable_for_large_n() -> None:
    n, c, k = 1000, 3, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # C(1000, 500) overflows a float
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    got = pass_at_k_tensor(torch.arange(n).unsqueeze(0) < c, k)
    assert got.item() == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "match"), [(4, 1, 0, "k=0"), (4, 1, 5, "k=5"), (4, -1, 2, "c=-1"), (4, 5, 2, "c=5")]
)
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_tensor_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="0/1"):
        pass_at_k_tensor(torch.tensor([[0.5, 1.0]]), 1)
    with pytest.raises(ValueError, match="shape"):
        pass_at_k_tensor(torch.ones(3, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="k=3.*n=2"):
        pass_at_k_tensor(torch.ones(1, 2), 3)


# ---- maj@n -------------------------------------------------------------------------------------------------

MAJORITY_CASES = [
    # (keys, correct, expected): the majority key is wrong although a sample is right
    (["7", "8", "7"], [0, 1, 0], 0.0),
    (["8", "7", "8"], [1, 0, 1], 1.0),
    # ties: the key appearing first wins
    (["b", "a", "a", "b"], [1, 0, 0, 1], 1.0),
    (["a", "b", "b", "a"], [0, 1, 1, 0], 0.0),
    # None casts no vote, even when it is the most frequent entry
    ([None, None, "x", None], [0, 0, 0, 0], 0.0),
    ([None, "x", None, "y", "y"], [0, 0, 0, 1, 1], 1.0),
    # no answer at all scores 0 whatever the flags say
    ([None, None, None], [1, 1, 1], 0.0),
    # correctness of the winning key is read from its first sample
    (["z", "z", "q"], [1, 0, 0], 1.0),
]


def test_majority_hand_worked_examples() -> None:
    for keys, flags, expected in MAJORITY_CASES:
        got = majority_correct(torch.tensor([flags], dtype=torch.bool), [keys])
        assert got.tolist() == [expected], (keys, flags)


def test_majority_rejects_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="answer_keys"):
        majority_correct(torch.zeros(2, 3), [["a", "b", "c"]])
    with pytest.raises(ValueError, match="answer_keys"):
        MajorityAtK().update(torch.zeros(1, 2))


# ---- Metric classes ----------------------------------------------------------------------------------------


def _random_batches(seed: int, sizes: list[int], n: int = 8) -> list[tuple[torch.Tensor, list[list[str | None]]]]:
    """Batches of P=sizes[i] problems; keys from a small alphabet, key "0" (and only it) graded correct."""
    rng = random.Random(seed)
    batches = []
    for p in sizes:
        keys = [[rng.choice(["0", "1", "2", None]) for _ in range(n)] for _ in range(p)]
        correct = torch.tensor([[key == "0" for key in row] for row in keys])
        batches.append((correct, keys))
    return batches


def _reference(batches, ks: list[int]) -> dict[str, float]:
    """Means over all problems of c/n, comb-form pass@k and a Counter-based majority vote."""
    rows = [(r.int().tolist(), keys) for correct, keys_b in batches for r, keys in zip(correct, keys_b)]
    n = len(rows[0][0])
    out = {"accuracy": sum(sum(f) / n for f, _ in rows) / len(rows)}
    for k in ks:
        out[f"pass@{k}"] = sum(1 - math.comb(n - sum(f), k) / math.comb(n, k) for f, _ in rows) / len(rows)
    maj = 0.0
    for flags, keys in rows:
        counts = Counter(key for key in keys if key is not None)
        if counts:
            best = min(counts, key=lambda key: (-counts[key], keys.index(key)))
            maj += flags[keys.index(best)]
    out[f"maj@{n}"] = maj / len(rows)
    return out


def test_metrics_accumulate_as_mean_over_all_problems() -> None:
    batches = _random_batches(0, [3, 1, 7, 4])
    expected = _reference(batches, [1, 2, 4, 8])
    metrics = {"accuracy": MeanAtK(), "pass@1": PassAtK(1), "pass@4": PassAtK(4), "maj@8": MajorityAtK()}
    for correct, keys in batches:
        for metric in metrics.values():
            metric.update(correct, keys)
    for name, metric in metrics.items():
        assert metric.compute().item() == pytest.approx(expected[name], abs=1e-12), name
    assert expected["accuracy"] == pytest.approx(expected["pass@1"])  # pass@1 is accuracy


def test_reset_and_forward() -> None:
    first, second = _random_batches(1, [5, 6])
    metric = PassAtK(2)
    metric.update(*first)
    metric.reset()
    assert metric.forward(*second).item() == pytest.approx(_reference([second], [2])["pass@2"])
    assert metric.compute().item() == pytest.approx(_reference([second], [2])["pass@2"])


def test_pass_at_k_metric_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="k=4.*n=2"):
        PassAtK(4).update(torch.ones(3, 2))


def test_default_ks() -> None:
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError):
        default_ks(0)


def test_eval_metrics_keys_values_and_checks() -> None:
    batches = _random_batches(2, [2, 5, 3])
    metrics = EvalMetrics(n=8)
    for correct, keys in batches:
        metrics.update(correct, keys)
    out = metrics.compute()
    assert set(out) == {"accuracy", "pass@1", "pass@2", "pass@4", "pass@8", "maj@8"}
    for name, value in _reference(batches, [1, 2, 4, 8]).items():
        assert out[name].item() == pytest.approx(value, abs=1e-12), name

    with pytest.raises(ValueError, match="n=8.*n=4"):  # a different n, and no state moved
        metrics.update(torch.ones(1, 4), [["0"] * 4])
    assert metrics.compute()["accuracy"].item() == pytest.approx(out["accuracy"].item())

    learned = EvalMetrics(ks=[2, 1])  # n taken from the first update
    with pytest.raises(RuntimeError, match="before any update"):
        learned.compute()
    learned.update(*batches[0])
    assert set(learned.compute()) == {"accuracy", "pass@1", "pass@2", "maj@8"}
    learned.reset()
    learned.update(torch.ones(1, 3), [["a", "a", "b"]])  # reset forgets a learned n
    assert {k: v.item() for k, v in learned.compute().items()} == {"accuracy": 1, "pass@1": 1, "pass@2": 1, "maj@3": 1}

    with pytest.raises(ValueError, match="k=4.*n=3"):
        EvalMetrics(ks=[4]).update(torch.ones(1, 3), [["a"] * 3])
    with pytest.raises(ValueError):
        EvalMetrics(ks=[1, 16], n=8)
    with pytest.raises(ValueError):
        EvalMetrics()


# ---- DDP sync ----------------------------------------------------------------------------------------------

RANK_SIZES = [[3, 5], [2]]  # rank 0 sees 8 problems in two batches, rank 1 sees 2


def _ddp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    try:
        metrics, idle = EvalMetrics(ks=[1, 2, 4]), MeanAtK()
        for correct, keys in _random_batches(10 + rank, RANK_SIZES[rank]):
            metrics.update(correct, keys)
            if rank == 0:
                idle.update(correct)  # rank 1 never updates this one but still takes part in the sync
        result = {name: value.item() for name, value in metrics.compute().items()}
        result["idle"] = idle.compute().item()
        result["local_count"] = metrics.metrics["accuracy"].count.item()  # local state restored after compute
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_compute_equals_single_process_over_union(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    union = [b for rank, sizes in enumerate(RANK_SIZES) for b in _random_batches(10 + rank, sizes)]
    single = EvalMetrics(ks=[1, 2, 4])
    for correct, keys in union:
        single.update(correct, keys)
    expected = {name: value.item() for name, value in single.compute().items()}
    assert expected == pytest.approx(_reference(union, [1, 2, 4]), abs=1e-12)
    rank0_only = MeanAtK()
    for correct, _ in _random_batches(10, RANK_SIZES[0]):
        rank0_only.update(correct)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result.pop("local_count") == sum(RANK_SIZES[rank])
        assert result.pop("idle") == pytest.approx(rank0_only.compute().item(), abs=1e-12)
        assert result == pytest.approx(expected, abs=1e-12)
