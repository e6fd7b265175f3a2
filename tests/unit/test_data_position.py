"""TrainPosition: which training batches a checkpoint counts as trained (nothing is generated here)."""

from __future__ import annotations

import pytest

from capo_lightning.data.position import TrainPosition


def test_the_newest_batch_counts_only_once_the_trainer_has_processed_it() -> None:
    position = TrainPosition()
    position.handed_out(processed=0)
    assert position.batches == 1
    assert position.trained(processed=0) == 0  # still inside its training step: a checkpoint now replays it
    assert position.trained(processed=1) == 1
    position.handed_out(processed=1)
    assert (position.trained(processed=1), position.trained(processed=2)) == (1, 2)


def test_without_a_trainer_every_batch_handed_out_counts() -> None:
    position = TrainPosition()
    position.handed_out(None)
    position.handed_out(None)
    assert position.trained(None) == 2


def test_a_restart_continues_after_the_checkpointed_count_with_nothing_in_flight() -> None:
    position = TrainPosition()
    position.handed_out(processed=3)
    position.restart(5)
    assert position.batches == 5 and position.trained(processed=0) == 5
    with pytest.raises(ValueError, match=">= 0"):
        position.restart(-1)


def test_a_new_trainer_run_keeps_the_batches_handed_out() -> None:
    position = TrainPosition()
    position.handed_out(processed=7)  # the last batch of a run whose Trainer had processed 7
    position.new_run()  # a new Trainer counts from 0 again: that batch is not "in flight" there
    assert position.trained(processed=0) == 1
