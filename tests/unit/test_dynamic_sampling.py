"""The agreement rule of DAPO's dynamic sampling (``keep_varied_groups``), in pure Python.

Two simulated ranks run ``keep_varied_groups`` in two threads; :class:`StandInAnyRank` stands in for the
collective (``reduce_boolean_decision(..., all=False)`` of the strategy): each call waits for the other rank's
and returns whether any rank said True. The real collective, under FSDP2 and DDP, is
tests/integration/test_collective_agreement.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from capo_lightning.data.rollout import Sampled, ScoredGroup, keep_varied_groups

# a rank left short at the round limit warns that zero-variance groups fill its batch: expected here
pytestmark = pytest.mark.filterwarnings("ignore:capo. dynamic sampling found")


class StandInAnyRank:
    """A stand-in for the all-reduce that ranks agree through: ``world`` threads, each call answered with
    whether any thread's decision was True; every call of every rank is recorded."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=10)
        self.lock = threading.Lock()
        self.pending: list[bool] = []
        self.calls: dict[int, int] = {}

    def for_rank(self, rank: int) -> Callable[[bool], bool]:
        def any_rank(decision: bool) -> bool:
            with self.lock:
                self.pending.append(decision)
                self.calls[rank] = self.calls.get(rank, 0) + 1
            self.barrier.wait()
            answer = any(self.pending)
            if self.barrier.wait() == 0:  # everyone has read the answer: the next call starts afresh
                self.pending.clear()
            self.barrier.wait()
            return answer

        return any_rank


def group(name: str, varied: bool) -> ScoredGroup:
    return ScoredGroup(item=None, prompt=name, completions=[], rewards=[0.0, 1.0] if varied else [1.0, 1.0])


def rounds_of(rank: str, varied_in: list[list[bool]]) -> list[list[ScoredGroup]]:
    """One rank's rounds: ``varied_in[r][j]`` says whether group j of round r varies."""
    return [[group(f"{rank}{r}.{j}", v) for j, v in enumerate(flags)] for r, flags in enumerate(varied_in)]


def sample(rounds: list[list[ScoredGroup]], wanted: int, max_rounds: int, any_rank=None) -> tuple[Sampled, list]:
    """``keep_varied_groups`` over pre-made rounds; returns what it kept and the refill rounds it asked for."""
    asked: list[int] = []

    def more(round_: int) -> list[ScoredGroup]:
        asked.append(round_)
        return rounds[round_]

    return keep_varied_groups(rounds[0], wanted, max_rounds, more, any_rank), asked


def on_two_ranks(per_rank: list[list[list[ScoredGroup]]], wanted: int, max_rounds: int):
    """Both ranks at once, agreeing through the stand-in; returns (results per rank, agreement calls per rank)."""
    agreement = StandInAnyRank(world=2)
    results: list = [None, None]

    def run(rank: int) -> None:
        results[rank] = sample(per_rank[rank], wanted, max_rounds, agreement.for_rank(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(r is not None for r in results), "a simulated rank hung"
    return results, agreement.calls


def names(sampled: Sampled) -> list[str]:
    return [g.prompt for g in sampled.groups]


def test_every_rank_runs_the_rounds_of_the_neediest_and_keeps_its_first_groups() -> None:
    needy = rounds_of("a", [[False, False], [False, True], [True, False], [True, True]])  # 2 varied by round 3
    content = rounds_of("b", [[True, True], [True, True], [True, True], [True, True]])  # done after round 1
    (a, a_asked), (b, b_asked) = on_two_ranks([needy, content], wanted=2, max_rounds=4)[0]
    assert a_asked == b_asked == [1, 2]  # the content rank sampled the needy rank's rounds too
    assert a.stats["rollout/sampling_rounds"] == b.stats["rollout/sampling_rounds"] == 3.0
    assert names(b) == ["b0.0", "b0.1"]  # its first varied groups; the rounds after are discarded
    assert names(a) == ["a1.1", "a2.0"]
    assert b.stats["rollout/groups_generated"] == 6.0 and b.stats["rollout/groups_filled"] == 0.0
    # each rank's batch is the one it would have made deciding alone; only the round counts differ
    for rounds, agreed in ((needy, a), (content, b)):
        alone, _ = sample(rounds, wanted=2, max_rounds=4)
        assert names(agreed) == names(alone)


def test_at_the_round_limit_every_rank_tops_up_in_order_and_agrees_no_more() -> None:
    never = rounds_of("a", [[False, False]] * 3)
    once = rounds_of("b", [[True, False], [False, False], [True, True]])  # 1 varied in round 1, 3 by round 3
    ((a, a_asked), (b, b_asked)), calls = on_two_ranks([never, once], wanted=2, max_rounds=3)
    assert a_asked == b_asked == [1, 2]
    assert calls == {0: 2, 1: 2}  # one agreement per round that leaves a round to spare, none after the last
    assert names(a) == ["a0.0", "a0.1"] and a.stats["rollout/groups_filled"] == 2.0  # zero-variance, first ones
    assert names(b) == ["b0.0", "b2.0"] and b.stats["rollout/groups_filled"] == 0.0


def test_when_no_rank_needs_more_there_is_one_round_and_one_agreement() -> None:
    full = [rounds_of(rank, [[True, True], [True, True]]) for rank in "ab"]
    ((a, a_asked), (b, b_asked)), calls = on_two_ranks(full, wanted=2, max_rounds=2)
    assert a_asked == b_asked == [] and calls == {0: 1, 1: 1}
    assert a.stats["rollout/sampling_rounds"] == b.stats["rollout/sampling_rounds"] == 1.0


@pytest.mark.parametrize("max_rounds", [1, 3])
def test_one_process_decides_alone_without_an_agreement(max_rounds: int) -> None:
    rounds = rounds_of("a", [[True, False], [True, True], [True, True]])
    kept, asked = sample(rounds, wanted=2, max_rounds=max_rounds)  # any_rank None: no collective
    assert asked == ([1] if max_rounds == 3 else [])
    assert names(kept) == (["a0.0", "a1.0"] if max_rounds == 3 else ["a0.0", "a0.1"])
