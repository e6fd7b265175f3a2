"""The monitoring callbacks on real short runs of the tiny model: what they log equals what the selection held.

Every expected value is recomputed in the test from the recorded selections (:class:`SelectionRecorder`),
with numpy where the callback uses torch, and compared with the CSV the callbacks wrote.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from capo_lightning.callbacks import (
    CurvatureMonitor,
    RejectionMonitor,
)
from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.data.prompts import ArithmeticSource
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.selection import CAPOSelector
from tests.helpers import (
    RankBatches,
    SelectionRecorder,
    make_trainer,
    read_csv_metrics,
    tiny_datamodule,
    tiny_rollout,
)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def _datamodule() -> RolloutDataModule:
    return tiny_datamodule(val_source=ArithmeticSource(seed=5, max_value=20), val_prompts=4)


def _records(folder: Path, rank: int = 0) -> dict[int, dict]:
    return {int(p.stem.split("step")[1]): torch.load(p) for p in sorted(folder.glob(f"rank{rank}_step*.pt"))}


def _train_rows(rows: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    return {int(r["step"]): r for r in rows if "train/reward_mean" in r}


def _fit(tmp_path: Path, model_dir: Path, callbacks: list, steps: int = 3, selector=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = CAPOModule(
        policy=PolicySpec(str(model_dir)), selector=selector or CAPOSelector(delta_f=1e-4, tau_h=1e-2), optimizer=adamw
    )
    settings = dict(logger=CSVLogger(str(tmp_path), name="logs"), limit_val_batches=0, log_every_n_steps=1)
    settings.update(trainer_kwargs)
    trainer = make_trainer(steps, callbacks=[SelectionRecorder(str(tmp_path / "sel")), *callbacks], **settings)
    trainer.fit(module, datamodule=_datamodule())
    return trainer, read_csv_metrics(tmp_path / "logs")


def test_rejection_monitor_logs_pooled_counts_and_running_totals(tmp_path: Path, tiny_model_dir: Path) -> None:
    _, rows = _fit(tmp_path, tiny_model_dir, [RejectionMonitor()])
    records, train = _records(tmp_path / "sel"), _train_rows(rows)
    assert sorted(train) == sorted(records) == [1, 2, 3]
    totals = np.zeros(4)
    rates = []
    for step, rec in records.items():
        judged = rec["judged"].numpy()
        fisher, hessian = rec["failed"]["fisher"].numpy() & judged, rec["failed"]["hessian"].numpy() & judged
        counts = np.array([judged.sum(), (fisher | hessian).sum(), fisher.sum(), hessian.sum()], dtype=float)
        totals += counts
        row = train[step]
        assert row["select/tokens_judged"] == counts[0] and row["select/tokens_rejected"] == counts[1]
        assert row["select/token_reject_rate"] == pytest.approx(counts[1] / counts[0], abs=1e-7)
        assert row["select/reject_rate_fisher"] == pytest.approx(counts[2] / counts[0], abs=1e-7)
        assert row["select/reject_rate_hessian"] == pytest.approx(counts[3] / counts[0], abs=1e-7)
        assert row["select/token_reject_rate_cum"] == pytest.approx(totals[1] / totals[0], abs=1e-7)
        adv = np.broadcast_to(rec["advantages"].numpy()[:, None], judged.shape)
        rejected = judged & (fisher | hessian)
        for sign, key in ((adv > 0, "pos"), (adv < 0, "neg")):
            want = (rejected & sign).sum() / max((judged & sign).sum(), 1)
            assert row[f"select/reject_rate_{key}_adv"] == pytest.approx(want, abs=1e-7)
        share = (rejected & (adv > 0)).sum() / max(rejected.sum(), 1)
        assert row["select/rejected_pos_adv_share"] == pytest.approx(share, abs=1e-7)
        rates.append(counts[1] / counts[0])
    assert 0 < max(rates) and min(rates) < 1, rates  # the comparison is not all-or-nothing


def test_curvature_monitor_logs_statistics_of_the_selection_shifts(tmp_path: Path, tiny_model_dir: Path) -> None:
    _, rows = _fit(tmp_path, tiny_model_dir, [CurvatureMonitor(histogram_every_n_steps=1)])
    records, train = _records(tmp_path / "sel"), _train_rows(rows)
    kept_fewer = False
    for step, rec in records.items():
        judged, keep = rec["judged"], rec["judged"] & rec["token_mask"]
        kept_fewer |= bool(0 < keep.sum() < judged.sum())
        row = train[step]
        for prefix, tokens in (("token", judged), ("masked_token", keep)):
            for name in ("fisher", "hessian"):
                values = rec["shifts"][f"token_{name}"][tokens].double().numpy()
                key = f"curvature/{prefix}_{name}"
                if values.size == 0:  # nothing kept: NaN (a 0 would read as "tiny shifts")
                    assert all(math.isnan(row[f"{key}_{s}"]) for s in ("mean", "max", "p50", "p95")), (key, step)
                    continue
                want = (values.mean(), values.max(), np.percentile(values, 50), np.percentile(values, 95))
                got = [row[f"{key}_{s}"] for s in ("mean", "max", "p50", "p95")]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12, err_msg=f"{key} step {step}")
        for key in ("global_fisher", "global_hessian", "masked_global_fisher", "masked_global_hessian"):
            assert row[f"curvature/{key}"] == pytest.approx(float(rec["shifts"][key]), rel=1e-6)
    assert kept_fewer  # the masked statistics were over a strict subset at least once


def test_monitors_log_nothing_without_a_selector(tmp_path: Path, tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw)
    monitors = [RejectionMonitor(), CurvatureMonitor()]
    trainer = make_trainer(2, callbacks=monitors, logger=CSVLogger(str(tmp_path)), log_every_n_steps=1)
    trainer.fit(module, datamodule=_datamodule())
    keys = set().union(*read_csv_metrics(tmp_path))
    assert "train/reward_mean" in keys
    assert not [k for k in keys if k.startswith(("select/", "curvature/"))]


def test_two_rank_rejection_counts_are_summed_not_averaged(tmp_path: Path, tiny_model_dir: Path) -> None:
    # rank 0 trains on 3 prompts, rank 1 on 1: unequal token counts, so pooled != mean of per-rank rates
    batches = [tiny_rollout(tiny_model_dir, num_prompts=n, max_new_tokens=12, seed=s) for n, s in ((3, 3), (1, 4))]
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), selector=CAPOSelector(), optimizer=adamw)
    module.configure_model()
    callbacks = [SelectionRecorder(str(tmp_path / "sel")), RejectionMonitor(), CurvatureMonitor()]
    trainer = make_trainer(
        1,
        callbacks=callbacks,
        logger=CSVLogger(str(tmp_path), name="logs"),
        strategy="ddp_spawn",
        devices=2,
        log_every_n_steps=1,
    )
    trainer.fit(module, train_dataloaders=RankBatches(batches))
    (row,) = _train_rows(read_csv_metrics(tmp_path / "logs")).values()
    recs = [_records(tmp_path / "sel", rank)[1] for rank in (0, 1)]
    judged = [int(r["judged"].sum()) for r in recs]
    rejected = [int((r["judged"] & (r["failed"]["fisher"] | r["failed"]["hessian"])).sum()) for r in recs]
    assert judged[0] != judged[1]
    assert row["select/tokens_judged"] == sum(judged) and row["select/tokens_rejected"] == sum(rejected)
    pooled = sum(rejected) / sum(judged)
    assert row["select/token_reject_rate"] == pytest.approx(pooled, abs=1e-7)
    per_rank_mean = (rejected[0] / judged[0] + rejected[1] / judged[1]) / 2
    if abs(per_rank_mean - pooled) > 1e-6:  # the old, wrong definition gives another number here
        assert row["select/token_reject_rate"] != pytest.approx(per_rank_mean, abs=1e-7)
    # token percentiles are over both ranks' tokens together
    values = torch.cat([r["shifts"]["token_fisher"][r["judged"]] for r in recs]).double().numpy()
    assert row["curvature/token_fisher_p95"] == pytest.approx(np.percentile(values, 95), rel=1e-5)
    assert row["curvature/token_fisher_max"] == pytest.approx(values.max(), rel=1e-6)
