"""Behaviour of CAPOSelector on real hidden states of the tiny model (capo-method.md sections 2.6 and 3).

What is pinned down here:
1. masks: monotone in delta_F and tau_H, equal to the threshold rule on the reported shifts (symmetric
   and one-sided windows), rejection rates in [0, 1]; enforce=False masks nothing but measures the same;
   padding positions never matter;
2. no gradient flows through selection, and a module step with CAPO has exactly the gradient of the same
   loss with a fixed, precomputed mask;
3. the shadow Adam moves only through accepted tokens, once per optimizer step, with
   m = (1 - b1) * per-row mean of the accepted tokens' gradients after the first step;
4. the shadow Adam survives a checkpoint round trip and a resumed fit continues it;
5. one process on the whole batch and two DDP processes on half the groups each end with the same state;
6. with huge thresholds, one CAPO step is the no-selector step.

Module runs use plain SGD (update = -lr * gradient), so equal updates mean equal gradients.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor

from capo_lightning.callbacks import RejectionMonitor
from capo_lightning.models.forward import score_responses
from capo_lightning.models.policy import PolicySpec, lm_head_weight, load_policy
from capo_lightning.module import CAPOModule
from capo_lightning.objectives import GRPO
from capo_lightning.selection import CAPOSelector, Selection, Selector, TokenView
from capo_lightning.selection import curvature as C
from capo_lightning.training.result import step_result
from tests.helpers import SGD, FixedBatches, make_trainer, tiny_rollout

LR = 0.1  # SGD learning rate of the module runs, hence also the TokenView.lr the selector sees
HUGE = 1e30
B1, B2 = 0.9, 0.999


# ---- picklable pieces (ddp_spawn pickles the module and the dataloader) ---------------------------
class FixedMask(Selector):
    """Returns one precomputed mask, whatever it is shown."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.mask = mask.clone()

    def forward(self, view: TokenView) -> Selection:
        return Selection(token_mask=self.mask.to(view.response_mask.device).clone())


class Record(L.Callback):
    """Keeps (global_step, adam_step, token mask) after every training batch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []
        self.masks: list[Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step, int(pl_module.selector.adam_step)))
        self.masks.append(step_result(outputs).selection.token_mask.detach().clone())


# ---- data: real rollouts and real LM-head inputs of the tiny model --------------------------------
@pytest.fixture(scope="module")
def real(tiny_model_dir: Path) -> dict:
    """4 prompts x 4 real samples (length reward: advantages vary), and the fresh policy's hidden states."""
    batch = tiny_rollout(tiny_model_dir, num_prompts=4)
    assert not bool(batch.response_mask.all()), "the batch needs padding positions"
    policy, _ = load_policy(PolicySpec(str(tiny_model_dir)))  # fresh weights, as every module run starts
    with torch.no_grad():
        out = score_responses(
            policy, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1], need_hidden=True
        )
    adv = GRPO().advantages(batch.rewards, batch.group_ids)  # [N]
    assert (adv != 0).sum() >= 12
    return {
        "batch": batch,
        "hidden": out.hidden,
        "old": out.logprobs.detach(),
        "lm_head": lm_head_weight(policy).detach().clone(),
        "adv": adv,
        "policy": policy,
    }


def _view(real: dict, lr: float = LR, adv: Tensor | None = None, **overrides) -> TokenView:
    batch = real["batch"]
    adv = real["adv"] if adv is None else adv
    fields = dict(
        actions=batch.responses,
        response_mask=batch.response_mask,
        advantages=adv.unsqueeze(1).expand_as(real["old"]).clone(),
        old_logprobs=real["old"],
        hidden=real["hidden"],
        lm_head=real["lm_head"],
        lr=lr,
    )
    fields.update(overrides)
    return TokenView(**fields)


def _nonzero_adv(real: dict) -> Tensor:
    """GRPO advantages with the exact zeros replaced: a zero-advantage token has m_F = m_H = 0 and is kept
    by any threshold."""
    adv = real["adv"]
    return torch.where(adv == 0, torch.full_like(adv, 0.5), adv)


def _selector(state: dict | None = None, num_vocab: int = 512, hidden: int = 64, **kwargs) -> CAPOSelector:
    sel = CAPOSelector(**kwargs)
    sel.build(num_vocab, hidden)
    if state is not None:
        sel.load_state_dict(state)
    return sel


def _state(sel: CAPOSelector) -> dict:
    return {k: v.detach().clone() for k, v in sel.state_dict().items()}


def _warm_state(real: dict, **kwargs) -> dict:
    """Shadow-Adam state after one step that accepted every token (non-zero m, v on many rows)."""
    sel = _selector(delta_f=HUGE, tau_h=HUGE, **kwargs)
    sel(_view(real, adv=_nonzero_adv(real)))
    assert int(sel.adam_step) == 1 and sel.adam_m.abs().sum() > 0
    return _state(sel)


def _token_shifts(real: dict, state: dict | None = None, view: TokenView | None = None, **kwargs) -> tuple:
    """(m_F, m_H) of the valid tokens, measured without touching any state (enforce=False)."""
    sel = _selector(state, enforce=False, **kwargs)
    out = sel(view or _view(real))
    valid = (view or _view(real)).response_mask
    return out.shifts["token_fisher"][valid], out.shifts["token_hessian"][valid]


def _gap_threshold(values: Tensor, quantile: float) -> float:
    """A threshold in the widest relative gap between consecutive distinct positive values near
    ``quantile``: no token sits within float noise of it, so runs that differ only in rounding agree."""
    v = torch.unique(values.double().abs())
    v = v[v > 0]
    n = v.numel()
    assert n >= 10
    centre = int(quantile * (n - 1))
    lo, hi = max(0, centre - max(1, n // 8)), min(n - 2, centre + max(1, n // 8))
    i = max(range(lo, hi + 1), key=lambda j: float(v[j + 1] / v[j]))
    assert float(v[i + 1] / v[i]) > 1.001, "no clear gap near the quantile"
    return float((v[i] * v[i + 1]).sqrt())


def _flat(module: CAPOModule) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.policy.parameters()])


def _fit(
    model_dir: Path,
    batches,
    selector: Selector | None,
    max_steps: int = 1,
    callbacks: list | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs,
) -> tuple[Tensor, CAPOModule, L.Trainer]:
    """One fit from fresh weights with SGD(LR) and no clipping; returns (flat update, module, trainer)."""
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec(str(model_dir)), selector=selector, optimizer=SGD(LR), max_grad_norm=None)
    module.configure_model()  # before fit: ddp_spawn copies rank-0 state back only into an existing policy
    before = _flat(module)
    trainer = make_trainer(max_steps, callbacks, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=batches, ckpt_path=ckpt_path)
    return _flat(module) - before, module, trainer


# =================================================================================================
# 1. masks
# =================================================================================================
@pytest.mark.parametrize("warm", [False, True], ids=["fresh_state", "warm_state"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one_sided"])
def test_mask_is_the_threshold_rule_and_monotone_in_both_thresholds(real: dict, warm: bool, symmetric: bool) -> None:
    state = _warm_state(real) if warm else None
    fisher, hessian = _token_shifts(real, state)
    assert (hessian < 0).any(), "the grid needs negative objective shifts to tell the two windows apart"
    qs = (0.15, 0.5, 0.85)
    deltas = [1e-30] + [_gap_threshold(fisher, q) for q in qs] + [HUGE]
    taus = [1e-30] + [_gap_threshold(hessian, q) for q in qs] + [HUGE]
    valid = real["batch"].response_mask
    n_valid = int(valid.sum())
    masks = {}
    for df in deltas:
        for th in taus:
            sel = _selector(state, delta_f=df, tau_h=th, symmetric=symmetric)
            out = sel(_view(real))
            mask = out.token_mask
            assert mask.dtype == torch.bool and mask.shape == valid.shape
            assert bool(mask[~valid].all()), "padding positions are left to the response mask"
            keep = mask[valid]
            # the rule of capo-method.md 3.1, on the shifts the selector itself reports
            f, h = out.shifts["token_fisher"][valid], out.shifts["token_hessian"][valid]
            torch.testing.assert_close(f, fisher, rtol=0, atol=0)
            torch.testing.assert_close(h, hessian, rtol=0, atol=0)
            ok_f = f < df
            ok_h = ((-th < h) if symmetric else (h >= 0)) & (h < th)
            assert torch.equal(keep, ok_f & ok_h), (df, th)
            # rejection rates: fractions of the valid tokens, consistent with each other and the mask
            m = out.metrics
            rate, rate_f, rate_h = (
                m["select/token_reject_rate"].item(),
                m["select/reject_rate_fisher"].item(),
                m["select/reject_rate_hessian"].item(),
            )
            for r in (rate, rate_f, rate_h):
                assert 0.0 <= r <= 1.0
            assert rate == pytest.approx(1 - int(keep.sum()) / n_valid, abs=1e-6)
            assert rate_f == pytest.approx(float((~ok_f).float().mean()), abs=1e-6)
            assert rate_h == pytest.approx(float((~ok_h).float().mean()), abs=1e-6)
            assert max(rate_f, rate_h) - 1e-6 <= rate <= rate_f + rate_h + 1e-6
            masks[(df, th)] = keep
    # looser thresholds never reject a token that tighter ones keep
    for (df1, th1), k1 in masks.items():
        for (df2, th2), k2 in masks.items():
            if df1 <= df2 and th1 <= th2:
                assert not bool((k1 & ~k2).any()), f"({df1:g}, {th1:g}) keeps a token ({df2:g}, {th2:g}) rejects"
    kept = sorted({int(k.sum()) for k in masks.values()})
    assert len(kept) >= 5, f"the grid is nearly trivial: kept counts {kept}"
    if not warm:  # raw-gradient directions: a zero-advantage token has m_F = m_H = 0 and survives anything
        zero_adv = (real["adv"] == 0).unsqueeze(1).expand_as(valid)[valid]
        assert torch.equal(masks[(1e-30, 1e-30)], zero_adv)
    assert bool(masks[(HUGE, HUGE)].all() if symmetric else torch.equal(masks[(HUGE, HUGE)], hessian >= 0))


def test_one_sided_window_rejects_negative_shifts_the_symmetric_window_keeps(real: dict) -> None:
    _, hessian = _token_shifts(real)
    tau = _gap_threshold(hessian, 0.6)
    valid = real["batch"].response_mask
    sym = _selector(delta_f=HUGE, tau_h=tau, symmetric=True)(_view(real)).token_mask[valid]
    one = _selector(delta_f=HUGE, tau_h=tau, symmetric=False)(_view(real)).token_mask[valid]
    small_negative = (hessian < 0) & (hessian > -tau)
    assert small_negative.any()
    assert bool(sym[small_negative].all()) and not bool(one[small_negative].any())
    assert torch.equal(one, sym & (hessian >= 0))


@pytest.mark.parametrize("warm", [False, True], ids=["fresh_state", "warm_state"])
def test_enforce_false_masks_nothing_but_measures_the_same(real: dict, warm: bool) -> None:
    state = _warm_state(real) if warm else None
    fisher, hessian = _token_shifts(real, state)
    kwargs = dict(delta_f=_gap_threshold(fisher, 0.5), tau_h=_gap_threshold(hessian, 0.7))
    on, off = _selector(state, **kwargs), _selector(state, enforce=False, **kwargs)
    got_on, got_off = on(_view(real)), off(_view(real))
    valid = real["batch"].response_mask
    assert not bool(got_on.token_mask[valid].all()) and bool(got_on.token_mask[valid].any())
    assert bool(got_off.token_mask.all()), "enforce=False must keep every token"
    for key in ("token_fisher", "token_hessian", "global_fisher", "global_hessian"):
        assert torch.equal(got_on.shifts[key], got_off.shifts[key]), key
    for key in ("select/token_reject_rate", "select/reject_rate_fisher", "select/reject_rate_hessian"):
        assert got_on.metrics[key].item() == got_off.metrics[key].item(), key
    assert got_off.metrics["select/token_reject_rate"].item() > 0  # it reports what it would have rejected
    # nothing is masked, so the "masked" global shifts are the global ones, and the state never moves
    assert torch.equal(got_off.shifts["masked_global_fisher"], got_off.shifts["global_fisher"])
    assert torch.equal(got_off.shifts["masked_global_hessian"], got_off.shifts["global_hessian"])
    before = state or _state(_selector())
    for key, value in off.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(on.adam_step) == int(before["adam_step"]) + 1


def test_padding_positions_never_affect_the_selection(real: dict) -> None:
    view = _view(real)
    valid = view.response_mask
    n, length = valid.shape
    # garbage everywhere the response mask is False, plus three extra all-padding columns
    extra = 3
    pad = torch.zeros(n, length + extra, dtype=torch.bool)
    pad[:, :length] = ~valid
    pad[:, length:] = True
    mask2 = torch.zeros(n, length + extra, dtype=torch.bool)
    mask2[:, :length] = valid
    hidden2 = torch.full((n, length + extra, view.hidden.shape[2]), float("nan"))
    hidden2[:, :length][valid] = view.hidden[valid]
    hidden2[pad] = torch.where(torch.rand(int(pad.sum()), 1) < 0.5, float("nan"), 1e6)
    actions2 = torch.randint(0, 512, (n, length + extra))
    actions2[:, :length][valid] = view.actions[valid]
    adv2 = torch.full((n, length + extra), 1e4)
    adv2[:, :length][valid] = view.advantages[valid]
    old2 = torch.full((n, length + extra), float("nan"))
    old2[:, :length] = view.old_logprobs
    view2 = TokenView(
        actions=actions2, response_mask=mask2, advantages=adv2, old_logprobs=old2, hidden=hidden2,
        lm_head=view.lm_head, lr=view.lr,
    )  # fmt: skip
    kwargs = dict(
        delta_f=_gap_threshold(_token_shifts(real)[0], 0.5), tau_h=_gap_threshold(_token_shifts(real)[1], 0.7)
    )
    state = _warm_state(real)
    a, b = _selector(state, **kwargs), _selector(state, **kwargs)
    got, got2 = a(view), b(view2)
    assert bool(got2.token_mask[pad].all())
    assert torch.equal(got2.token_mask[mask2], got.token_mask[valid])
    for key in ("token_fisher", "token_hessian"):
        assert torch.equal(got2.shifts[key][mask2], got.shifts[key][valid]), key
        assert bool((got2.shifts[key][pad] == 0).all()), key
    for key in ("global_fisher", "global_hessian", "masked_global_fisher", "masked_global_hessian"):
        torch.testing.assert_close(got2.shifts[key], got.shifts[key], rtol=1e-6, atol=0, msg=key)
    for key, value in got.metrics.items():
        assert torch.isfinite(got2.metrics[key]), key
        torch.testing.assert_close(got2.metrics[key], value, rtol=1e-6, atol=0, msg=key)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-6, atol=0, msg=key)


# =================================================================================================
# 2. no gradient through selection
# =================================================================================================
def _grad_inputs(real: dict) -> TokenView:
    """A view whose hidden states and LM head require grad (the policy's own weight)."""
    return _view(real, hidden=real["hidden"].clone().requires_grad_(True), lm_head=lm_head_weight(real["policy"]))


def _assert_no_grad(sel: CAPOSelector, out: Selection) -> None:
    assert not out.token_mask.requires_grad
    for key, value in {**out.shifts, **out.metrics}.items():
        assert not value.requires_grad, key
    for key, value in sel.state_dict(keep_vars=True).items():
        assert not value.requires_grad and value.grad_fn is None, key


def test_selection_under_no_grad_carries_no_graph_even_from_inputs_that_require_grad(real: dict) -> None:
    view = _grad_inputs(real)
    assert view.hidden.requires_grad and view.lm_head.requires_grad
    sel = _selector(delta_f=1e-2, tau_h=1e-1)
    with torch.no_grad():  # as CAPOModule._select calls it
        for _ in range(2):
            _assert_no_grad(sel, sel(view))


def test_selection_outside_no_grad_with_detached_inputs_carries_no_graph(real: dict) -> None:
    """The TokenView contract: every tensor is detached (CAPOModule passes lm_head.detach())."""
    sel = _selector(delta_f=1e-2, tau_h=1e-1)
    for _ in range(2):
        _assert_no_grad(sel, sel(_view(real)))


def test_selection_outside_no_grad_with_grad_inputs_carries_no_graph(real: dict) -> None:
    sel = _selector(delta_f=1e-2, tau_h=1e-1)
    _assert_no_grad(sel, sel(_grad_inputs(real)))


def test_module_gradient_with_capo_is_the_gradient_with_the_same_fixed_mask(tiny_model_dir: Path, real: dict) -> None:
    batch = real["batch"]
    fisher, hessian = _token_shifts(real)
    kwargs = dict(delta_f=_gap_threshold(fisher, 0.5), tau_h=_gap_threshold(hessian, 0.7))
    precomputed = _selector(**kwargs)(_view(real)).token_mask  # fresh state, as the module starts
    valid = batch.response_mask
    assert 0.2 < float(precomputed[valid].float().mean()) < 0.9
    rec = Record()
    capo, _, _ = _fit(tiny_model_dir, FixedBatches([batch]), CAPOSelector(**kwargs), callbacks=[rec])
    assert torch.equal(rec.masks[0], precomputed), "the module's selection differs from the precomputed one"
    fixed, _, _ = _fit(tiny_model_dir, FixedBatches([batch]), FixedMask(precomputed))
    unmasked, _, _ = _fit(tiny_model_dir, FixedBatches([batch]), None)
    scale = float(fixed.abs().max())
    assert scale > 1e-4
    torch.testing.assert_close(capo, fixed, rtol=0, atol=1e-6 * scale)
    assert float((unmasked - fixed).abs().max()) > 1e-2 * scale, "the mask should change the gradient"


# =================================================================================================
# 3. shadow Adam
# =================================================================================================
def test_everything_rejected_leaves_moments_zero_and_still_counts_the_step(real: dict) -> None:
    """All tokens rejected: m and v stay exactly zero; adam_step still advances by one, as the official
    ``SparseAdamModel.update_effective_gradient_moments`` does (``t += 1`` before looping over an empty dict)."""
    view = _view(real, adv=_nonzero_adv(real))
    sel = _selector(delta_f=1e-30, tau_h=1e-30)
    out = sel(view)
    valid = view.response_mask
    assert not bool(out.token_mask[valid].any())
    assert out.metrics["select/token_reject_rate"].item() == 1.0
    assert not bool(sel.adam_m.any()) and not bool(sel.adam_v.any())
    assert int(sel.adam_step) == 1
    assert out.shifts["masked_global_fisher"].item() == 0.0 and out.shifts["masked_global_hessian"].item() == 0.0


def test_after_an_all_rejected_step_directions_fall_back_to_the_raw_gradient(real: dict) -> None:
    view = _view(real, adv=_nonzero_adv(real))
    sel = _selector(delta_f=1e-30, tau_h=1e-30)
    sel(view)
    assert not bool(sel.adam_m.any())  # the shadow state is still empty
    probe = _selector(_state(sel), enforce=False)
    fresh = _selector(enforce=False)
    got, want = probe(view), fresh(view)
    torch.testing.assert_close(got.shifts["token_fisher"], want.shifts["token_fisher"])
    torch.testing.assert_close(got.shifts["token_hessian"], want.shifts["token_hessian"])


def test_rows_touched_only_by_rejected_tokens_keep_their_moments(real: dict) -> None:
    k = 8  # a small subspace, so some rows are touched by rejected tokens only
    view = _view(real, adv=_nonzero_adv(real))
    state = _warm_state(real, top_k=k)
    fisher, hessian = _token_shifts(real, state, view=view, top_k=k)
    sel = _selector(state, top_k=k, delta_f=_gap_threshold(fisher, 0.5), tau_h=_gap_threshold(hessian, 0.8))
    keep = sel(view).token_mask[view.response_mask]
    assert keep.any() and (~keep).any()
    valid = view.response_mask
    top = C.topk_policy(view.hidden[valid], view.lm_head, view.actions[valid], k)
    accepted_rows = torch.zeros(512, dtype=torch.bool)
    accepted_rows[top.ids[keep].unique()] = True
    rejected_rows = torch.zeros(512, dtype=torch.bool)
    rejected_rows[top.ids[~keep].unique()] = True
    only_rejected = rejected_rows & ~accepted_rows
    assert int(only_rejected.sum()) >= 5, "the test needs rows that only rejected tokens touch"
    assert state["adam_m"][only_rejected].abs().sum() > 0, "those rows should carry warm moments"
    for name in ("adam_m", "adam_v"):
        new, old = getattr(sel, name), state[name]
        assert torch.equal(new[~accepted_rows], old[~accepted_rows]), f"{name} moved on a row no kept token touches"
        assert not torch.equal(new[accepted_rows], old[accepted_rows])
    assert int(sel.adam_step) == 2


def test_first_moment_is_the_per_row_mean_of_accepted_token_gradients(real: dict) -> None:
    k = 8
    view = _view(real)
    fisher, hessian = _token_shifts(real, top_k=k)
    sel = _selector(top_k=k, delta_f=_gap_threshold(fisher, 0.6), tau_h=_gap_threshold(hessian, 0.7))
    keep = sel(view).token_mask[view.response_mask]
    assert keep.any() and (~keep).any()
    # brute force: every accepted token's gradient block, row by row, in a python loop
    valid = view.response_mask
    hidden, adv = view.hidden[valid].float(), view.advantages[valid].float()
    top = C.topk_policy(hidden, view.lm_head, view.actions[valid], k)
    grads = C.token_gradients(top, hidden, adv)  # [T, k, d]
    rows: dict[int, list[Tensor]] = {}
    for t in range(grads.shape[0]):
        if keep[t]:
            for j in range(k):
                rows.setdefault(int(top.ids[t, j]), []).append(grads[t, j])
    want_m, want_v = torch.zeros(512, 64), torch.zeros(512, 64)
    for row, parts in rows.items():
        mean = torch.stack(parts).mean(0)
        want_m[row], want_v[row] = (1 - B1) * mean, (1 - B2) * mean * mean
    assert len(rows) > 20
    torch.testing.assert_close(sel.adam_m, want_m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sel.adam_v, want_v, rtol=1e-5, atol=1e-10)
    assert int(sel.adam_step) == 1


def test_full_vocabulary_gradients_match_autograd(real: dict) -> None:
    """With top_k >= V the token gradient is the exact LM-head gradient of A log pi(a | s):
    m after one step is (1 - b1) x the mean over accepted tokens of autograd's gradient."""
    view = _view(real)
    fisher, hessian = _token_shifts(real, top_k=512)
    sel = _selector(top_k=512, delta_f=_gap_threshold(fisher, 0.6), tau_h=_gap_threshold(hessian, 0.7))
    keep = sel(view).token_mask[view.response_mask]
    assert keep.any() and (~keep).any()
    valid = view.response_mask
    hidden, adv, actions = view.hidden[valid], view.advantages[valid], view.actions[valid]
    total = torch.zeros(512, 64)
    for t in torch.nonzero(keep).squeeze(1).tolist():
        w = view.lm_head.clone().requires_grad_(True)
        (adv[t] * torch.log_softmax(w @ hidden[t], dim=-1)[actions[t]]).backward()
        total += w.grad
    torch.testing.assert_close(sel.adam_m, (1 - B1) * total / int(keep.sum()), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("enforce", [True, False])
def test_module_advances_the_shadow_adam_once_per_optimizer_step(
    tiny_model_dir: Path, real: dict, enforce: bool
) -> None:
    fisher, hessian = _token_shifts(real)
    sel = CAPOSelector(delta_f=_gap_threshold(fisher, 0.5), tau_h=_gap_threshold(hessian, 0.8), enforce=enforce)
    rec = Record()
    _, module, trainer = _fit(tiny_model_dir, FixedBatches([real["batch"]] * 3), sel, max_steps=3, callbacks=[rec])
    assert trainer.global_step == 3
    if enforce:
        assert rec.steps == [(1, 1), (2, 2), (3, 3)]
        assert module.selector.adam_m.abs().sum() > 0
    else:
        assert rec.steps == [(1, 0), (2, 0), (3, 0)]  # baselines never warm the shadow state (spec 2.6)
        assert not bool(module.selector.adam_m.any()) and not bool(module.selector.adam_v.any())
        assert all(bool(m.all()) for m in rec.masks)


# =================================================================================================
# 4. checkpoint round trip
# =================================================================================================
def test_shadow_adam_survives_a_checkpoint_and_a_resumed_fit_continues_it(
    tiny_model_dir: Path, real: dict, tmp_path: Path
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    fisher, hessian = _token_shifts(real)
    kwargs = dict(delta_f=_gap_threshold(fisher, 0.5), tau_h=_gap_threshold(hessian, 0.8))
    batches = FixedBatches([real["batch"]] * 2)
    ckdir = tmp_path / "ck"
    saver = ModelCheckpoint(dirpath=ckdir, save_last=True, save_top_k=0, every_n_train_steps=1)
    _, first, _ = _fit(
        tiny_model_dir, batches, CAPOSelector(**kwargs), max_steps=2, callbacks=[saver], enable_checkpointing=True
    )
    assert int(first.selector.adam_step) == 2
    last = ckdir / "last.ckpt"
    assert last.exists(), sorted(p.name for p in ckdir.iterdir())
    # load into a fresh module: configure_model() allocates the state, load_state_dict fills it
    fresh = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), selector=CAPOSelector(**kwargs), optimizer=SGD(LR))
    fresh.configure_model()
    assert int(fresh.selector.adam_step) == 0
    fresh.load_state_dict(torch.load(last, weights_only=False)["state_dict"])
    for name in ("adam_m", "adam_v", "adam_step"):
        assert torch.equal(getattr(fresh.selector, name), getattr(first.selector, name)), name
    # resume: the third step continues the same state, exactly as an uninterrupted 3-step run
    rec = Record()
    _, resumed, trainer = _fit(
        tiny_model_dir, batches, CAPOSelector(**kwargs), max_steps=3, callbacks=[rec], ckpt_path=str(last)
    )
    assert trainer.global_step == 3 and rec.steps == [(3, 3)]
    _, straight, _ = _fit(tiny_model_dir, batches, CAPOSelector(**kwargs), max_steps=3)
    for name in ("adam_m", "adam_v", "adam_step"):
        assert torch.equal(getattr(resumed.selector, name), getattr(straight.selector, name)), name


# =================================================================================================
# 5. one process vs two DDP processes
# =================================================================================================
DDP_RUN = """
import os, sys
sys.path.insert(0, {root!r})
os.environ["HF_HUB_OFFLINE"] = "1"
import lightning as L
import torch
from capo_lightning.module import CAPOModule
from capo_lightning.models.policy import PolicySpec
from capo_lightning.selection import CAPOSelector
from tests.helpers import RankBatches
from torch.nn.parallel import DistributedDataParallel

BROADCAST = []  # data pointers of the tensors DDP broadcasts before a forward (broadcast_buffers)
_broadcast = DistributedDataParallel._distributed_broadcast_coalesced


def _record(self, tensors, *args, **kwargs):
    BROADCAST.extend(t.data_ptr() for t in tensors)
    return _broadcast(self, tensors, *args, **kwargs)


DistributedDataParallel._distributed_broadcast_coalesced = _record


class SGD:
    def __call__(self, params):
        return torch.optim.SGD(params, lr={lr!r})


if __name__ == "__main__":
    halves = torch.load({batches!r}, weights_only=False)
    torch.manual_seed(0)
    selector = CAPOSelector(delta_f={delta_f!r}, tau_h={tau_h!r})
    module = CAPOModule(policy=PolicySpec({model!r}), selector=selector, optimizer=SGD(), max_grad_norm=None)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=RankBatches(halves))
    state = dict((k, v.clone()) for k, v in module.selector.state_dict().items())
    torch.save(state, {out!r}.format(rank=trainer.global_rank))
    pointers = dict(
        broadcast=BROADCAST,
        selector=[b.data_ptr() for b in module.selector.buffers()],
        policy=[b.data_ptr() for b in module.policy.buffers()],
    )
    torch.save(pointers, {out!r}.format(rank=trainer.global_rank) + ".broadcast")
"""


def test_two_process_ddp_shadow_adam_equals_single_process(tiny_model_dir: Path, real: dict, tmp_path: Path) -> None:
    """strategy="ddp" (what the CLI gets for devices > 1): every rank builds its own model in its own process."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    batch = real["batch"]  # 4 groups of 4
    halves = [
        batch.select(torch.nonzero((batch.group_ids == 2 * r) | (batch.group_ids == 2 * r + 1)).squeeze(1))
        for r in range(2)
    ]
    fisher, hessian = _token_shifts(real)
    kwargs = dict(delta_f=_gap_threshold(fisher, 0.6), tau_h=_gap_threshold(hessian, 0.8))
    keep = _selector(**kwargs)(_view(real)).token_mask[batch.response_mask]
    assert 0.3 < float(keep.float().mean()) < 0.95, "many tokens kept, but not all"
    torch.save(halves, tmp_path / "halves.pt")
    script = tmp_path / "ddp_capo.py"
    out = str(tmp_path / "state{rank}.pt")
    script.write_text(
        DDP_RUN.format(
            root=str(ROOT), lr=LR, batches=str(tmp_path / "halves.pt"), model=str(tiny_model_dir), out=out, **kwargs
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    _, single, _ = _fit(tiny_model_dir, FixedBatches([batch]), CAPOSelector(**kwargs))  # meanwhile, one process
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [torch.load(out.format(rank=r)) for r in range(2)]
    want = {k: v for k, v in single.selector.state_dict().items()}
    assert int(want["adam_step"]) == 1
    for rank, got in enumerate(ranks):
        assert int(got["adam_step"]) == 1, rank
        for name in ("adam_m", "adam_v"):
            scale = float(want[name].abs().max())
            assert scale > 0
            torch.testing.assert_close(
                got[name], want[name], rtol=1e-5, atol=1e-6 * scale, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}"
            )
    # the selector's state stayed out of DDP's per-step buffer broadcast (checked on the tensors DDP hands to
    # its broadcast); the policy's buffers went through it, so the recorder saw the broadcast
    for rank in range(2):
        pointers = torch.load(out.format(rank=rank) + ".broadcast")
        assert pointers["broadcast"] and set(pointers["policy"]) <= set(pointers["broadcast"]), rank
        assert not set(pointers["selector"]) & set(pointers["broadcast"]), rank
    # a rank on its own would have got a different state: the all-reduce of sums and counts matters
    alone = _selector(**kwargs)
    rows = torch.nonzero((batch.group_ids == 0) | (batch.group_ids == 1)).squeeze(1)
    half = halves[0]
    alone(_view(real, actions=half.responses, response_mask=half.response_mask,
                advantages=real["adv"][rows].unsqueeze(1).expand_as(half.response_mask).float(),
                old_logprobs=real["old"][rows], hidden=real["hidden"][rows]))  # fmt: skip
    scale = float(want["adam_m"].abs().max())
    assert float((alone.adam_m - want["adam_m"]).abs().max()) > 1e-3 * scale


UNPICKLE_AND_SCORE = """
import pickle, sys
sys.path.insert(0, {root!r})
import torch
from capo_lightning.models.forward import score_responses

policy, batch = pickle.load(open({blob!r}, "rb"))
out = score_responses(policy, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1], need_hidden=True)
print("HIDDEN", out.hidden is not None)
"""


def test_a_policy_unpickled_in_a_fresh_process_still_returns_hidden_states(
    tiny_model_dir: Path, real: dict, tmp_path: Path
) -> None:
    import pickle
    import subprocess
    import sys

    from tests.conftest import ROOT

    policy, _ = load_policy(PolicySpec(str(tiny_model_dir)))  # never run: a run installs unpicklable hooks
    blob = tmp_path / "policy.pkl"
    blob.write_bytes(pickle.dumps((policy, real["batch"])))
    script = tmp_path / "unpickle.py"
    script.write_text(UNPICKLE_AND_SCORE.format(root=str(ROOT), blob=str(blob)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if done.returncode != 0:
        assert "'NoneType' object is not subscriptable" in done.stderr, done.stderr[-2000:]  # any other crash fails
        raise TypeError(done.stderr[-600:])
    assert "HIDDEN True" in done.stdout


# =================================================================================================
# 6. huge thresholds = no selection
# =================================================================================================
def test_huge_thresholds_keep_everything_and_give_the_no_selector_update(tiny_model_dir: Path, real: dict) -> None:
    batch = real["batch"]
    rec = Record()
    capo, module, trainer = _fit(
        tiny_model_dir,
        FixedBatches([batch]),
        CAPOSelector(delta_f=HUGE, tau_h=HUGE),
        callbacks=[rec, RejectionMonitor()],
    )
    plain, _, plain_trainer = _fit(tiny_model_dir, FixedBatches([batch]), None)
    assert bool(rec.masks[0].all())
    assert trainer.callback_metrics["select/token_reject_rate"].item() == 0.0
    assert int(module.selector.adam_step) == 1
    assert float(plain.abs().max()) > 1e-4
    assert torch.equal(capo, plain), f"max difference {float((capo - plain).abs().max()):.3e}"
    assert trainer.callback_metrics["objective/loss"].item() == plain_trainer.callback_metrics["objective/loss"].item()


def test_an_unbuilt_selector_loads_a_trained_shadow_adam() -> None:
    # what ddp_spawn does after fit: the main process's module was never configured, its selector never built
    trained = CAPOSelector()
    trained.build(7, 3)
    trained.adam_m.normal_()
    trained.adam_v.uniform_()
    trained.adam_step.fill_(4)
    fresh = CAPOSelector()
    assert fresh.adam_m.numel() == 0
    fresh.load_state_dict(trained.state_dict())
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


# =================================================================================================
# 7. the top-k subspace can come from the scoring forward
# =================================================================================================
@pytest.mark.parametrize("warm", [False, True], ids=["fresh_state", "warm_state"])
def test_mask_is_unchanged_when_the_forward_supplies_the_top_k(real: dict, warm: bool) -> None:
    """The ids the scoring forward found in its own logits give the same mask and shifts as the selector's
    own top-k search (same inputs, thresholds in the thick of the shift distribution)."""
    batch, k = real["batch"], 8
    state = _warm_state(real, top_k=k) if warm else None
    with torch.no_grad():
        out = score_responses(
            real["policy"], batch.input_ids, batch.attention_mask, batch.response_mask.shape[1], topk=k
        )
    valid = batch.response_mask
    own = C.topk_policy(real["hidden"][valid], real["lm_head"], batch.responses[valid], k)
    assert torch.equal(C.with_action(out.topk_ids[valid], batch.responses[valid]), own.ids)
    fisher, hessian = _token_shifts(real, state, top_k=k)
    thresholds = dict(delta_f=_gap_threshold(fisher, 0.5), tau_h=_gap_threshold(hessian, 0.5), top_k=k)
    searched = _selector(state, **thresholds)(_view(real))
    given = _selector(state, **thresholds)(_view(real, topk_ids=out.topk_ids))
    assert torch.equal(given.token_mask, searched.token_mask)
    assert 0 < int((given.token_mask & valid).sum()) < int(valid.sum())  # a mask that could have differed
    for name in ("token_fisher", "token_hessian", "global_fisher", "masked_global_hessian"):
        torch.testing.assert_close(given.shifts[name], searched.shifts[name], rtol=1e-5, atol=1e-12)
