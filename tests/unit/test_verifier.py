"""The grading pool's hard timeouts and MathReward's verifier health, with real grading processes.

``(x+1)^{999}`` vs ``x^{999}+1`` passes the in-process guard yet keeps sympy busy for about 3.6 s,
so it exercises the wall-clock timeout through the public reward; ``9^{9^{9^{9}}}`` would run for
minutes but the guard refuses it, so it is sent to the pool directly.
"""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest
import torch

from capo_lightning.rewards import MathReward, WeightedSum, format_reward, think_format_reward
from capo_lightning.rewards.verifier import GradingPool

SLOW_PRED, SLOW_GOLD = "(x+1)^{999}", "x^{999}+1"
TOWER = "9^{9^{9^{9}}}"
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def pool() -> GradingPool:
    pool = GradingPool(workers=2, timeout_s=TIMEOUT).start()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def reward() -> MathReward:
    reward = MathReward(timeout_s=TIMEOUT, workers=2)
    reward.pool.start()
    yield reward
    reward.close()


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def test_pool_grades_symbolic_pairs(pool: GradingPool) -> None:
    outcomes = pool.compare([("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}"), ("\\{1,2\\}", "\\{2,1\\}"), ("(1,2)", "(2,1)")])
    assert [o.equal for o in outcomes] == [True, True, False]
    assert all(o.status == "ok" for o in outcomes)
    assert pool.compare([]) == []


def test_a_hanging_comparison_times_out_and_the_pool_keeps_working(pool: GradingPool) -> None:
    (outcome,), seconds = _timed(pool.compare, [(TOWER, "1")])
    assert outcome.status == "timeout" and not outcome.equal
    assert TIMEOUT <= seconds < TIMEOUT + 1.0
    # the killed grading child is replaced: the next pairs are graded right away
    (after,), seconds = _timed(pool.compare, [("\\frac{1}{2}", "0.5")])
    assert after.equal and after.status == "ok" and seconds < 1.0


def test_timeouts_hold_in_a_worker_thread(pool: GradingPool) -> None:
    results = {}

    def work() -> None:
        results["out"] = _timed(pool.compare, [(TOWER, "2"), ("x+1", "1+x")])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=10)
    outcomes, seconds = results["out"]
    assert [o.status for o in outcomes] == ["timeout", "ok"] and outcomes[1].equal
    assert seconds < TIMEOUT + 1.0  # the two pairs run on two servers side by side


def test_pairs_keep_their_order_across_servers(pool: GradingPool) -> None:
    pairs = [(f"\\frac{{{i}}}{{2}}", f"{i / 2}") if i % 3 else (f"{i}+x", f"x+{i + 1}") for i in range(11)]
    assert [o.equal for o in pool.compare(pairs)] == [bool(i % 3) for i in range(11)]


def test_a_killed_server_is_replaced(pool: GradingPool) -> None:
    servers = list(pool._idle.queue)
    for server in servers:
        server.proc.kill()
        server.proc.wait()
    outcomes = pool.compare([("2x", "x+x"), ("3", "x")])
    assert [o.equal for o in outcomes] == [True, False]
    assert all(s.alive for s in pool._idle.queue)


class _GradeInWorker(torch.utils.data.Dataset):
    """Grades in a DataLoader worker (a daemonic process: multiprocessing pools cannot start there)."""

    def __init__(self, pool: GradingPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        outcomes, seconds = _timed(self.pool.compare, [(TOWER, "3"), ("\\pi/2", "\\frac{\\pi}{2}")])
        return {"status": [o.status for o in outcomes], "equal": [o.equal for o in outcomes], "seconds": seconds}


def test_timeouts_hold_in_a_dataloader_worker(pool: GradingPool) -> None:
    # the forked worker inherits this (started) pool and must start its own servers, not share pipes
    loader = torch.utils.data.DataLoader(_GradeInWorker(pool), num_workers=1, batch_size=None)
    (item,) = list(loader)
    assert item["status"] == ["timeout", "ok"] and item["equal"] == [False, True]
    assert item["seconds"] < 10.0  # includes starting the worker's own servers
    assert pool.compare([("2^{10}", "1024")])[0].equal  # the parent's servers are untouched
    assert pool._pid == os.getpid()


def test_math_reward_times_out_through_the_public_api(reward: MathReward) -> None:
    reward.pop_stats()
    completions = [f"\\boxed{{{SLOW_PRED}}}", "\\boxed{\\frac{1}{2}}", "no answer here", "\\boxed{7}"]
    answers = [SLOW_GOLD, "0.5", "3", "8"]
    rewards, seconds = _timed(reward, completions, answers)
    assert rewards == [0.0, 1.0, 0.0, 0.0]
    assert seconds < TIMEOUT + 1.0
    stats = reward.pop_stats()
    assert stats["verifier/timeouts"] == 1.0
    assert stats["verifier/parse_fail_pred"] == pytest.approx(1 / 4)
    assert stats["verifier/parse_fail_gold"] == 0.0
    assert stats["verifier/latency_ms_max"] >= TIMEOUT * 1000
    assert reward.pop_stats() == {}  # popped


def test_unparseable_gold_is_reported_not_rewarded(reward: MathReward, caplog) -> None:
    reward.pop_stats()
    gold = "\\frac{1}{"  # broken LaTeX: math_verify keeps only its raw-string fallback
    with caplog.at_level("WARNING"):
        rewards = reward(["\\boxed{x+1}", "The answer is \\frac{1}{", "\\boxed{5}"], [gold, gold, gold])
    assert rewards == [0.0, 1.0, 0.0]  # only the exact string match scores
    stats = reward.pop_stats()
    assert stats["verifier/parse_fail_gold"] == pytest.approx(2 / 3)  # the two that needed sympy
    assert "cannot be parsed" in caplog.text and gold in caplog.text


def test_all_zero_batch_with_boxed_answers_warns(reward: MathReward, caplog) -> None:
    with caplog.at_level("WARNING"):
        reward([f"so \\boxed{{{i}}}" for i in range(4)], ["100"] * 4)
    assert "scored 0 although 4 contain" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        reward(["\\boxed{100}", "\\boxed{3}"], ["100", "100"])
    assert "scored 0" not in caplog.text


def test_math_reward_pickles_without_its_processes(reward: MathReward) -> None:
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.timeout_s == TIMEOUT and copy.workers == 2 and copy.pool._pid is None
    assert copy(["\\boxed{\\dfrac{3}{4}}"], ["0.75"]) == [1.0]
    copy.close()


def test_format_rewards_and_weighted_sum(reward: MathReward) -> None:
    completions = [
        "<think>2+2 is 4</think> \\boxed{4}",  # right, boxed, thought
        "\\boxed{4}",  # right, boxed, no thought
        "<think></think> \\boxed{5}",  # wrong, empty thought
        "<think>a</think><think>b</think> \\boxed{4}",  # two thoughts
        "\\boxed{4} <think>late</think>",  # box before the thought
    ]
    answers = ["4"] * 5
    assert format_reward(completions, answers) == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert think_format_reward(completions, answers) == [1.0, 0.0, 0.0, 0.0, 0.0]
    combined = WeightedSum([reward, think_format_reward], [1.0, 0.5])
    reward.pop_stats()
    assert combined(completions, answers) == [1.5, 1.0, 0.0, 1.0, 1.0]
    assert combined.pop_stats()["verifier/parse_fail_pred"] == 0.0
    with pytest.raises(ValueError, match="one weight per reward"):
        WeightedSum([reward], [1.0, 2.0])


def test_overlong_penalty_passes_the_math_rewards_stats_on(reward: MathReward) -> None:
    from capo_lightning.rewards.shaping import OverlongPenalty

    reward.pop_stats()
    shaped = OverlongPenalty(reward_fn=reward, max_tokens=100)
    rewards = shaped(["\\boxed{4}", "no answer"], ["4", "4"], completion_tokens=[10, 95])
    assert rewards == pytest.approx([1.0, -0.75])
    stats = shaped.pop_stats()
    assert stats["verifier/parse_fail_pred"] == pytest.approx(0.5)  # the base reward's, passed on
    assert reward.pop_stats() == {}  # taken from the base reward, not left to pile up there
