"""The collapse detector on real tiny-model runs, each signal injected: warn, stop and rollback act as documented."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from capo_lightning.callbacks import CollapseDetector
from capo_lightning.callbacks.collapse_signals import Thresholds, replay
from capo_lightning.models.policy import PolicySpec, lm_head_weight
from capo_lightning.module import CAPOModule
from capo_lightning.objectives import GRPO
from capo_lightning.training.optim import WarmupCosineLR
from tests.helpers import SIGNALS_OFF as OFF
from tests.helpers import length_reward, make_trainer, read_csv_metrics, tiny_datamodule


class ZeroAfter:
    """Length reward for the first ``calls`` batches, then 0 for every completion (a reward that dies)."""

    def __init__(self, calls: int) -> None:
        self.calls, self.seen = calls, 0

    def __call__(self, completions: list[str], answers: list[str], **columns) -> list[float]:
        self.seen += 1
        return length_reward(completions, answers) if self.seen <= self.calls else [0.0] * len(completions)


class SpikyGRPO(GRPO):
    """GRPO whose loss is multiplied by 1e4 at the given steps (1-based): a finite gradient spike."""

    def __init__(self, spike_steps: set[int]) -> None:
        super().__init__()
        self.spike_steps, self.calls = spike_steps, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = super().forward(*args, **kwargs)
        if self.calls in self.spike_steps:
            out.loss = out.loss * 1e4
        return out


class SharpenAt(L.Callback):
    """Multiplies the LM head by 50 before step ``step`` (1-based): the policy's entropy collapses."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                lm_head_weight(pl_module.policy).mul_(50.0)


class RollbackWitness(L.Callback):
    """After the detector (listed later): the weights right after a rollback and the learning rates around it."""

    def __init__(self, detector: CollapseDetector) -> None:
        self.detector, self.seen_rollbacks, self.found = detector, 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.base_before = list(trainer.lr_scheduler_configs[0].scheduler.base_lrs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.detector.rollbacks == self.seen_rollbacks:
            return
        self.seen_rollbacks = self.detector.rollbacks
        path, snapshot_step = self.detector.snapshot
        saved = torch.load(path, map_location="cpu", weights_only=False)
        current = pl_module.state_dict()
        identical = all(torch.equal(current[k], v) for k, v in saved["state_dict"].items())
        self.found.append(
            dict(
                step=trainer.global_step,
                snapshot_step=snapshot_step,
                identical=identical and saved["state_dict"].keys() == current.keys(),
                # the schedule's lr for the coming step (set by its last step()) and the optimizer's now
                lr=(
                    trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0],
                    trainer.optimizers[0].param_groups[0]["lr"],
                ),
                base=(self.base_before, list(trainer.lr_scheduler_configs[0].scheduler.base_lrs)),
            )
        )


def _fit(tmp_path: Path, model_dir: Path, callbacks: list, steps: int, reward=length_reward, objective=None):
    torch.manual_seed(0)
    module = CAPOModule(
        policy=PolicySpec(str(model_dir)),
        objective=objective or GRPO(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_ratio=0.0, total_steps=steps),
    )
    dm = tiny_datamodule(reward_fn=reward)
    trainer = make_trainer(
        steps,
        callbacks=callbacks,
        logger=CSVLogger(str(tmp_path), name="logs"),
        log_every_n_steps=1,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    return trainer, {int(r["step"]): r for r in read_csv_metrics(tmp_path / "logs") if "train/reward_mean" in r}


def test_warn_logs_a_dying_reward_and_the_run_goes_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    # rewards die after step 5: ema 0.7p (step 6), 0.49p < p/2 (step 7, first reading), 0.343p (step 8, alarm)
    detector = CollapseDetector(action="warn", warmup_steps=3, patience=2, **{**OFF, "reward_drop": 0.5})
    with pytest.warns(UserWarning, match=r"collapse detected at step 8 \(reward_drop"):
        trainer, rows = _fit(tmp_path, tiny_model_dir, [detector], steps=10, reward=ZeroAfter(5))
    assert trainer.global_step == 10
    assert [s for s, r in rows.items() if r["collapse/reward_drop"] == 1.0] == [7, 8, 9, 10]
    assert [s for s, r in rows.items() if r["collapse/alarm"] == 1.0] == [8]  # acted once, when patience ran out
    (decision,) = [json.loads(line) for line in (tmp_path / "logs/version_0/collapse.jsonl").read_text().splitlines()]
    assert decision["step"] == 8 and decision["action"] == "warn"
    assert decision["signals"][0]["signal"] == "reward_drop"
    # replaying the logged metrics offline raises the same alarm at the same step
    replayed = replay([rows[s] for s in sorted(rows)], Thresholds(**{**OFF, "reward_drop": 0.5}), warmup_steps=3)
    assert [(index + 1, reading.signal) for index, reading in replayed] == [(8, "reward_drop")]


def test_stop_ends_the_run_and_names_the_healthy_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    detector = CollapseDetector(
        action="stop", warmup_steps=3, patience=2, ema=0.5, snapshot_every_n_steps=2, **{**OFF, "entropy_ratio": 0.1}
    )
    with pytest.warns(UserWarning, match="entropy_collapse") as caught:
        trainer, rows = _fit(tmp_path, tiny_model_dir, [SharpenAt(7), detector], steps=30)
    message = next(str(w.message) for w in caught if "collapse detected" in str(w.message))
    assert trainer.global_step < 30  # stopped early
    assert rows[trainer.global_step]["collapse/alarm"] == 1.0
    assert rows[6]["objective/entropy"] > 10 * rows[trainer.global_step]["objective/entropy"]  # it really collapsed
    first_reading = min(s for s, r in rows.items() if r["collapse/entropy_collapse"] == 1.0)
    path, step = detector.snapshot
    # candidates every 2 steps; the last one before the first reading is dropped, the one before it trusted
    assert step == 2 * ((first_reading - 1) // 2) - 2 and step <= 6 and Path(path).name == "healthy.ckpt"
    assert Path(path).exists()
    assert f"--ckpt_path {path}" in message and "Stopping" in message


def test_rollback_restores_the_snapshot_exactly_and_lowers_the_lr(tmp_path: Path, tiny_model_dir: Path) -> None:
    detector = CollapseDetector(
        action="rollback", warmup_steps=3, patience=2, lr_factor=0.5, snapshot_every_n_steps=1,
        **{**OFF, "grad_spike": 10.0},
    )  # fmt: skip
    witness = RollbackWitness(detector)
    with pytest.warns(UserWarning, match="Rolled back"):
        trainer, rows = _fit(tmp_path, tiny_model_dir, [detector, witness], steps=10, objective=SpikyGRPO({6, 7}))
    assert rows[6]["objective/grad_norm"] > 100 * rows[5]["objective/grad_norm"]  # the injected spike
    (event,) = witness.found
    assert event["step"] == 7 and event["snapshot_step"] == 4  # 5's candidate is dropped when step 6 spikes
    assert event["identical"]  # every tensor of the module (policy and selector state) is the snapshot's
    before, after = event["lr"]
    assert after == pytest.approx(0.5 * before)
    assert event["base"][1] == pytest.approx([0.5 * b for b in event["base"][0]])
    assert trainer.global_step == 10 and detector.rollbacks == 1
    # the schedule goes on at half its values: the lr each step used vs. the same schedule run alone
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule, planned = WarmupCosineLR(optimizer, warmup_ratio=0.0, total_steps=10), []
    for _ in range(10):
        planned.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [rows[s]["train/lr"] for s in (6, 7)] == pytest.approx(planned[5:7], rel=1e-6)
    assert [rows[s]["train/lr"] for s in (8, 9, 10)] == pytest.approx([0.5 * lr for lr in planned[7:10]], rel=1e-6)


def test_rollback_without_a_snapshot_stops_instead(tmp_path: Path, tiny_model_dir: Path) -> None:
    detector = CollapseDetector(
        action="rollback", warmup_steps=3, patience=1, snapshot_every_n_steps=0, **{**OFF, "grad_spike": 10.0}
    )
    with pytest.warns(UserWarning, match="no healthy snapshot to roll back to"):
        trainer, _ = _fit(tmp_path, tiny_model_dir, [detector], steps=10, objective=SpikyGRPO({6}))
    assert trainer.global_step == 6 and detector.rollbacks == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="action"):
        CollapseDetector(action="explode")
    with pytest.raises(ValueError, match="lr_factor"):
        CollapseDetector(lr_factor=2.0)
