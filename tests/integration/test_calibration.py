# ruff: noqa: F811 (the `real` fixture is imported from test_capo_selector and requested by name)
"""CAPO's calibrated thresholds (capo_lightning/selection/calibration.py), checked against independent computations.

1. the percentile is numpy's ``inverted_cdf`` order statistic; the thresholds are the percentiles of m_F and |m_H|
   evaluated at the reference lr, computed here with numpy from the token shifts of the curvature model;
2. the scaling law: a token's (a, b, c) reproduce its shifts at any lr exactly, delta_F scales with lr^2 exactly
   and tau_H with lr to first order, as documented;
3. the selector's warm-up: nothing masked, the shadow Adam advancing with every token, the raw-gradient first step
   and zero-advantage tokens left out, the thresholds set from the recorded tokens and then applied as fixed numbers;
4. the thresholds and the warm-up in progress survive a state-dict round trip (resume), and a checkpoint from
   before calibration existed still loads;
5. two gloo processes gather their tokens into the same sample as one process.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from capo_lightning.callbacks import RejectionMonitor
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.selection import CAPOSelector
from capo_lightning.selection import calibration as K
from capo_lightning.selection import curvature as C
from tests.helpers import SGD, FixedBatches, make_trainer, read_csv_metrics
from tests.integration.test_capo_selector import HUGE, LR, _nonzero_adv, _selector, _state, _view, real  # noqa: F401


def _np_percentile(values: Tensor | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="inverted_cdf"))


@pytest.mark.parametrize("q", [0.1, 5.0, 50.0, 95.0, 99.9, 100.0])
def test_percentile_is_numpys_inverted_cdf(q: float) -> None:
    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100, 1001):
        values = torch.randn(n, generator=generator, dtype=torch.float64).exp()
        assert K.percentile(values, q) == _np_percentile(values.numpy(), q)
    ties = torch.tensor([3.0, 1.0, 3.0, 3.0, 2.0], dtype=torch.float64)
    assert K.percentile(ties, q) == _np_percentile(ties.numpy(), q)
    with pytest.raises(ValueError):
        K.percentile(torch.zeros(0), q)


def _token_shift_parts(real: dict, lr: float, sel: CAPOSelector) -> tuple[C.Shifts, Tensor]:
    """The curvature model's own token shifts of ``real`` under ``sel``'s current direction, and the advantages."""
    valid = real["batch"].response_mask
    hidden, adv = real["hidden"][valid].float(), real["adv"].unsqueeze(1).expand_as(valid)[valid].float()
    top = C.topk_policy(hidden, real["lm_head"].float(), real["batch"].responses[valid], sel.top_k)
    return C.token_shifts(top, hidden, adv, lr, sel._direction()), adv


def test_lr_free_parts_give_the_curvature_models_shifts_at_every_lr(real: dict) -> None:
    """(a, b, c) of each token reproduce m_F and m_H as the curvature model computes them, at the lr they were
    measured at and at others: the scaling law is exact for a fixed direction."""
    sel = _selector(delta_f=HUGE, tau_h=HUGE)
    sel(_view(real, adv=_nonzero_adv(real)))  # a warm shadow Adam: Adam directions
    shifts, adv = _token_shift_parts(real, LR, sel)
    parts = K.lr_free_parts(shifts, adv)
    for lr in (LR, 3 * LR, LR / 7):
        at_lr, _ = _token_shift_parts(real, lr, sel)
        m_f, m_h = K.shifts_at(parts, lr)
        torch.testing.assert_close(m_f, at_lr.fisher.double(), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(m_h, at_lr.hessian.double(), rtol=1e-5, atol=1e-12)


def test_thresholds_are_the_percentiles_at_the_reference_lr_and_scale_as_documented() -> None:
    """A known stream of (a, b, c): the thresholds equal numpy's percentiles of m_F and |m_H| at lr_ref; doubling
    lr_ref multiplies delta_F by exactly 4 and tau_H by 2 when the second-order term is absent, and by the
    directly computed factor when it is not."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(500, generator=generator, dtype=torch.float64)
    b = torch.randn(500, generator=generator, dtype=torch.float64) * 10
    c = torch.rand(500, generator=generator, dtype=torch.float64) * 3
    parts, lr, q = torch.stack([a, b, c]), 2e-3, 95.0
    delta_f, tau_h = K.thresholds(parts, lr, q)
    assert delta_f == _np_percentile(0.5 * lr**2 * c.numpy(), q)
    assert tau_h == _np_percentile(np.abs(lr * a.numpy() + 0.5 * lr**2 * b.numpy()), q)
    delta_f2, tau_h2 = K.thresholds(parts, 2 * lr, q)
    assert delta_f2 == pytest.approx(4 * delta_f, rel=1e-12)
    assert tau_h2 == _np_percentile(np.abs(2 * lr * a.numpy() + 2 * lr**2 * b.numpy()), q)
    first_order = torch.stack([a, torch.zeros_like(b), c])
    assert K.thresholds(first_order, 2 * lr, q)[1] == pytest.approx(2 * K.thresholds(first_order, lr, q)[1], rel=1e-12)
    assert tau_h2 / tau_h == pytest.approx(2.0, rel=0.05)  # |lr b| << 2|a| here: first order holds to a few %


def _calibrating_selector(**kwargs) -> CAPOSelector:
    return _selector(delta_f=1e-30, tau_h=1e-30, calibration_steps=3, calibration_percentile=50.0, **kwargs)


def test_warm_up_masks_nothing_then_fixes_the_percentiles_of_the_recorded_tokens(real: dict) -> None:
    """Steps 1-3 mask nothing and advance the shadow Adam with every token; step 1 (raw-gradient direction) and
    zero-advantage tokens are not recorded; the thresholds are the percentiles, at the base lr, of what steps 2
    and 3 recorded (recomputed here from the curvature model); step 4 applies them as fixed numbers."""
    sel, base_lr = _calibrating_selector(), 2 * LR
    recorded = []
    for step in range(3):
        lr = LR * (step + 1) / 3  # a warm-up schedule: every step at another lr
        if step > 0:
            shifts, adv = _token_shift_parts(real, lr, sel)
            recorded.append(K.lr_free_parts(shifts, adv)[:, adv != 0])
        got = sel(_view(real, lr=lr, base_lr=base_lr))
        assert bool(got.token_mask.all()), f"the warm-up masks nothing (step {step})"
        assert float(got.metrics["select/calibrating"]) == 1.0 and int(sel.adam_step) == step + 1
        assert bool(sel.calibration_done) == (step == 2)
    parts = torch.cat(recorded, dim=1)
    valid = real["batch"].response_mask
    assert parts.shape[1] == 2 * int((real["adv"].unsqueeze(1).expand_as(valid)[valid] != 0).sum())
    torch.testing.assert_close(sel.calibration_parts, parts, rtol=1e-5, atol=1e-12)
    m_f, m_h = K.shifts_at(parts, base_lr)
    expected = (_np_percentile(m_f.numpy(), 50.0), _np_percentile(m_h.abs().numpy(), 50.0))
    assert sel.thresholds() == pytest.approx(expected, rel=1e-6)
    # step 4 enforces the calibrated thresholds exactly as a fixed-threshold selector with those numbers would
    fixed = _selector(_state(sel), delta_f=expected[0], tau_h=expected[1])  # the same shadow Adam, fixed numbers
    got, want = sel(_view(real, lr=base_lr)), fixed(_view(real, lr=base_lr))  # a step at the peak lr
    assert float(got.metrics["select/calibrating"]) == 0.0
    assert float(got.metrics["select/delta_f"]) == pytest.approx(expected[0], rel=1e-6)
    assert torch.equal(got.token_mask, want.token_mask)
    assert not bool(got.token_mask[valid].all()), "the median thresholds reject some tokens"


def test_calibration_lr_sets_the_reference_and_the_sgd_shadow_records_its_first_step(real: dict) -> None:
    """``calibration_lr`` replaces the base lr; with the SGD shadow model every warm-up step is recorded."""
    sel = _selector(delta_f=1.0, tau_h=1.0, calibration_steps=1, optimizer_model="sgd", calibration_lr=0.05)
    shifts, adv = _token_shift_parts(real, LR, sel)
    sel(_view(real, lr=LR, base_lr=1.0))
    m_f, m_h = K.shifts_at(K.lr_free_parts(shifts, adv)[:, adv != 0], 0.05)
    expected = (_np_percentile(m_f.numpy(), 95.0), _np_percentile(m_h.abs().numpy(), 95.0))
    assert sel.thresholds() == pytest.approx(expected, rel=1e-6)


def test_a_warm_up_that_records_nothing_goes_on(real: dict) -> None:
    """All advantages zero: nothing to record, so the warm-up continues past calibration_steps."""
    sel = _selector(delta_f=1.0, tau_h=1.0, calibration_steps=1, optimizer_model="sgd")
    for _ in range(2):
        sel(_view(real, adv=torch.zeros_like(real["adv"])))
    assert not bool(sel.calibration_done) and int(sel.calibration_seen) == 2
    sel(_view(real))
    assert bool(sel.calibration_done)


def test_resume_keeps_the_warm_up_in_progress_and_the_thresholds(real: dict) -> None:
    """A state dict taken mid-warm-up continues to the same thresholds; one taken after keeps them; a state dict
    without the calibration buffers (a checkpoint from before they existed) loads as never calibrated."""
    straight = _calibrating_selector()
    for step in range(3):
        straight(_view(real, lr=LR * (step + 1) / 3))
    resumed = _calibrating_selector()
    resumed(_view(real, lr=LR / 3))
    resumed = _calibrating_selector(state=_state(resumed))
    for step in (1, 2):
        resumed(_view(real, lr=LR * (step + 1) / 3))
    assert resumed.thresholds() == straight.thresholds()
    after = _calibrating_selector(state=_state(straight))
    assert after.thresholds() == straight.thresholds() and bool(after.calibration_done)
    old = {k: v for k, v in _state(straight).items() if not k.startswith("calibrat")}
    legacy = _selector(state=old, delta_f=1e-4, tau_h=0.01)
    assert not bool(legacy.calibration_done) and legacy.thresholds() == (1e-4, 0.01)


def test_selector_arguments_are_checked() -> None:
    for kwargs in ({"calibration_steps": -1}, {"calibration_percentile": 0.0}, {"calibration_lr": -1.0}):
        with pytest.raises(ValueError, match="calibration"):
            CAPOSelector(**kwargs)


def _gather_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values = torch.arange(3 * (rank + 2), dtype=torch.float64).view(3, -1) + 100 * rank  # 2 and 3 tokens

    def all_reduce(tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor)
        return tensor

    out[rank] = K.gather_by_sum(values, all_reduce).tolist()
    dist.destroy_process_group()


def test_two_processes_gather_every_token_in_rank_order() -> None:
    """gather_by_sum over two real gloo processes: both get [rank 0's tokens | rank 1's tokens]."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gather_worker, args=(port, out), nprocs=2, join=True)
        got = dict(out)
    mine = [torch.arange(3 * (r + 2), dtype=torch.float64).view(3, -1) + 100 * r for r in (0, 1)]
    expected = torch.cat(mine, dim=1).tolist()
    assert got[0] == expected and got[1] == expected


def _calibrated_fit(model_dir: Path, batches, max_steps: int, tmp: Path, ckpt_path: str | None = None) -> CAPOModule:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    selector = CAPOSelector(calibration_steps=2, calibration_percentile=50.0)
    module = CAPOModule(policy=PolicySpec(str(model_dir)), selector=selector, optimizer=SGD(LR), max_grad_norm=None)
    saver = ModelCheckpoint(dirpath=tmp / "ck", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = make_trainer(
        max_steps, [RejectionMonitor(prog_bar=False), saver], enable_checkpointing=True,
        logger=CSVLogger(tmp, name="logs"), log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=batches, ckpt_path=ckpt_path)
    return module


def test_a_fit_logs_the_calibrated_thresholds_and_a_resume_mid_warm_up_ends_with_the_same(
    tiny_model_dir: Path, real: dict, tmp_path: Path
) -> None:
    """A real fit: steps 1-2 measure (NaN thresholds logged, nothing rejected), step 3 logs the calibrated ones;
    the checkpoint holds them; a fit resumed from the step-1 checkpoint (mid warm-up) ends with the same."""
    batches = FixedBatches([real["batch"]] * 3)
    straight = _calibrated_fit(tiny_model_dir, batches, 3, tmp_path / "straight")
    rows = [r for r in read_csv_metrics(tmp_path / "straight" / "logs") if "select/calibrating" in r]
    assert [r["select/calibrating"] for r in rows] == [1.0, 1.0, 0.0]
    assert all(math.isnan(r["select/delta_f"]) and r["select/token_reject_rate"] == 0.0 for r in rows[:2])
    assert (rows[2]["select/delta_f"], rows[2]["select/tau_h"]) == pytest.approx(straight.selector.thresholds())
    assert rows[2]["select/token_reject_rate"] > 0
    saved = torch.load(tmp_path / "straight" / "ck" / "last.ckpt", weights_only=False)["state_dict"]
    assert tuple(saved["selector.calibrated"].tolist()) == straight.selector.thresholds()
    _calibrated_fit(tiny_model_dir, batches, 1, tmp_path / "first")
    resumed = _calibrated_fit(
        tiny_model_dir, batches, 3, tmp_path / "first", str(tmp_path / "first" / "ck" / "last.ckpt")
    )
    assert resumed.selector.thresholds() == straight.selector.thresholds()
    for name in ("adam_m", "adam_v", "adam_step", "calibration_parts"):
        assert torch.equal(getattr(resumed.selector, name), getattr(straight.selector, name)), name
