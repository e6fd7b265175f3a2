"""CAPOSelector's step in progress (judge per micro-batch, then close) on real hidden states of the tiny model.

A step that fails between ``judge`` and ``close`` must leave nothing behind: after ``abandon()`` (what the training
step calls), and also without it (``judge`` drops a record it cannot belong to), the next full step's Selection
and shadow-Adam advance are exactly those of a fresh selector with the same state.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import Tensor

from capo_lightning.selection import CAPOSelector, KeepAll, Selection, TokenView
from tests.integration import test_capo_selector as capo

real = capo.real  # the module-scoped fixture: 4 prompts x 4 real samples and the fresh policy's hidden states


def _part(view: TokenView, rows: Tensor) -> TokenView:
    """The micro-batch ``rows`` of a whole-step view, as the streaming step hands it to ``judge``."""
    sliced = ("actions", "response_mask", "advantages", "old_logprobs", "hidden")
    return dataclasses.replace(view, **{name: getattr(view, name)[rows] for name in sliced})


def _chunks(view: TokenView) -> list[Tensor]:
    """Two micro-batches, the longer rows first (as the step groups rows by length)."""
    lengths = view.response_mask.sum(1)
    return list(torch.argsort(lengths, descending=True, stable=True).split(view.response_mask.shape[0] // 2))


def _full_step(sel: CAPOSelector, view: TokenView) -> Selection:
    for rows in _chunks(view):
        sel.judge(_part(view, rows), rows)
    return sel.close()


def _setup(real: dict) -> tuple[dict, dict, TokenView]:
    """A warm shadow Adam, thresholds that keep some tokens and reject others, and the whole-step view."""
    state = capo._warm_state(real)
    fisher, hessian = capo._token_shifts(real, state)
    kwargs = dict(delta_f=capo._gap_threshold(fisher, 0.6), tau_h=capo._gap_threshold(hessian, 0.6))
    return state, kwargs, capo._view(real)


def _assert_same(a: Selection, b: Selection, sel_a: CAPOSelector, sel_b: CAPOSelector) -> None:
    assert torch.equal(a.token_mask, b.token_mask) and torch.equal(a.judged, b.judged)
    for name in ("failed", "shifts", "metrics"):
        left, right = getattr(a, name), getattr(b, name)
        assert left.keys() == right.keys(), name
        for key in left:
            assert torch.equal(left[key], right[key]), (name, key)
    state_a, state_b = capo._state(sel_a), capo._state(sel_b)
    for key in state_b:  # the shadow-Adam advance (m, v, step) and everything else the selector keeps
        assert torch.equal(state_a[key], state_b[key]), key


def test_a_step_abandoned_after_a_judge_leaves_no_trace_in_the_next(real: dict) -> None:
    state, kwargs, view = _setup(real)
    first = _chunks(view)[0]
    sel = capo._selector(state, **kwargs)
    with pytest.raises(RuntimeError, match="the micro-batch's backward failed"):
        try:  # what the streaming step does: a micro-batch judged, then something raises before close()
            sel.judge(_part(view, first), first)
            raise RuntimeError("the micro-batch's backward failed")
        except BaseException:
            sel.abandon()
            raise
    assert int(sel.adam_step) == 1  # abandon() undid nothing: only close() advances the shadow Adam
    fresh = capo._selector(state, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # abandon() left nothing for judge() to drop
        out = _full_step(sel, view)
    _assert_same(out, _full_step(fresh, view), sel, fresh)
    assert int(sel.adam_step) == 2 and 0 < int(out.token_mask[view.response_mask].sum()) < int(view.response_mask.sum())


def test_judge_drops_a_record_left_by_a_failed_step_that_did_not_abandon(real: dict) -> None:
    state, kwargs, view = _setup(real)
    first = _chunks(view)[0]
    sel = capo._selector(state, **kwargs)
    sel.judge(_part(view, first), first)  # a step that failed here, and nobody called abandon()
    fresh = capo._selector(state, **kwargs)
    with pytest.warns(RuntimeWarning, match="never reached close"):
        out = _full_step(sel, view)  # its first micro-batch repeats the stale rows: a new step
    _assert_same(out, _full_step(fresh, view), sel, fresh)


@pytest.mark.parametrize("change", ["lr", "length"])
def test_judge_drops_a_record_of_another_lr_or_response_length(real: dict, change: str) -> None:
    state, kwargs, view = _setup(real)
    second = _chunks(view)[1]
    stale = _part(view, second)
    if change == "lr":
        stale = dataclasses.replace(stale, lr=stale.lr / 2)
    else:  # a batch with longer responses: one more (padding) position
        grow = {"actions": 0, "response_mask": False, "advantages": 0.0, "old_logprobs": 0.0}
        widened = {
            k: torch.cat([getattr(stale, k), torch.full_like(getattr(stale, k)[:, :1], v)], 1) for k, v in grow.items()
        }
        hidden = torch.cat([stale.hidden, stale.hidden[:, :1]], 1)
        stale = dataclasses.replace(stale, hidden=hidden, **widened)
    sel = capo._selector(state, **kwargs)
    sel.judge(stale, second)  # rows disjoint from the next step's first micro-batch: only lr or length tell
    fresh = capo._selector(state, **kwargs)
    with pytest.warns(RuntimeWarning, match="never reached close"):
        out = _full_step(sel, view)
    _assert_same(out, _full_step(fresh, view), sel, fresh)


def test_a_stale_record_found_mid_step_makes_close_raise_rather_than_mix_two_steps(real: dict) -> None:
    state, kwargs, view = _setup(real)
    first, second = _chunks(view)
    sel = capo._selector(state, **kwargs)
    sel.judge(_part(view, second), second)  # a failed step judged these rows, no abandon(), same lr and length
    sel.judge(_part(view, first), first)  # the next step's first micro-batch: disjoint rows, admitted
    with pytest.warns(RuntimeWarning, match="never reached close"):
        sel.judge(_part(view, second), second)  # a row judged twice: the record is stale, dropped
    with pytest.raises(RuntimeError, match="not each of 0..N-1 once"):
        sel.close()  # the step's first rows went with the stale record: refuse, do not advance
    assert int(sel.adam_step) == 1
    fresh = capo._selector(state, **kwargs)
    _assert_same(_full_step(sel, view), _full_step(fresh, view), sel, fresh)  # and the next step is clean


def test_close_without_a_judged_micro_batch_and_abandon_without_a_step() -> None:
    sel = CAPOSelector()
    sel.abandon()  # nothing in progress: a no-op
    with pytest.raises(RuntimeError, match="no judged micro-batch"):
        sel.close()
    KeepAll().abandon()  # the contract's default: a no-op for selectors that keep nothing between judge and close
