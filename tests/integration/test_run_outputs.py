"""What a run shows and leaves: progress bar, end summary, step-0 baseline, completions log, step and time keys."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from capo_lightning.callbacks import (
    CapoProgressBar,
    CompletionsLog,
    RejectionMonitor,
    RunSummary,
    ValidateBeforeTraining,
)
from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.data.prompts import ArithmeticSource
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.rollout import SamplingConfig
from capo_lightning.selection import CAPOSelector
from capo_lightning.training import step_metrics
from tests.helpers import SelectionRecorder, make_trainer, read_csv_metrics, tiny_datamodule


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def _datamodule() -> RolloutDataModule:
    return tiny_datamodule(
        val_source=ArithmeticSource(seed=5, max_value=20),
        val_prompts=4,
        val_sampling=SamplingConfig(max_new_tokens=8, temperature=1.0),
    )


def _fit(root: Path, model_dir: Path, callbacks: list, steps: int = 4, ckpt_path: str | None = None, **kwargs):
    torch.manual_seed(0)
    module = CAPOModule(
        policy=PolicySpec(str(model_dir)),
        selector=kwargs.pop("selector", None),
        optimizer=adamw,
        ppo_epochs=kwargs.pop("ppo_epochs", 1),
    )
    settings = dict(
        logger=CSVLogger(str(root), name="logs"),
        log_every_n_steps=1,
        default_root_dir=str(root),
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    settings.update(kwargs)
    trainer = make_trainer(steps, callbacks=callbacks, **settings)
    trainer.fit(module, datamodule=_datamodule(), ckpt_path=ckpt_path)
    return trainer, read_csv_metrics(root / "logs")


def test_baseline_validation_logs_step_zero_and_leaves_training_unchanged(tmp_path: Path, tiny_model_dir: Path) -> None:
    _, plain = _fit(tmp_path / "plain", tiny_model_dir, [])
    _, with_base = _fit(tmp_path / "base", tiny_model_dir, [ValidateBeforeTraining()])
    val_steps = [int(r["step"]) for r in with_base if "val/accuracy" in r]
    assert val_steps == [0, 2, 4]
    assert [int(r["step"]) for r in plain if "val/accuracy" in r] == [2, 4]

    def rewards(rows):
        return [(int(r["step"]), r["train/reward_mean"]) for r in rows if "train/reward_mean" in r]

    assert rewards(with_base) == rewards(plain) and len(rewards(plain)) == 4  # same rollouts, same updates


def test_baseline_validation_is_skipped_when_resuming(tmp_path: Path, tiny_model_dir: Path) -> None:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=2
    )
    _fit(tmp_path / "first", tiny_model_dir, [checkpoint, ValidateBeforeTraining()], steps=2, enable_checkpointing=True)
    _, rows = _fit(
        tmp_path / "resumed",
        tiny_model_dir,
        [ValidateBeforeTraining()],
        steps=4,
        ckpt_path=str(tmp_path / "ckpt/last.ckpt"),
    )
    assert [int(r["step"]) for r in rows if "val/accuracy" in r] == [4]  # no step-2 "baseline" of trained weights
    assert [int(r["step"]) for r in rows if "train/reward_mean" in r] == [3, 4]


def test_step_column_counts_optimizer_steps_for_training_and_validation(tmp_path: Path, tiny_model_dir: Path) -> None:
    # two optimizer steps per rollout batch: the CSV's step is global_step, as max_steps and the bar count
    trainer, rows = _fit(tmp_path, tiny_model_dir, [], steps=4, ppo_epochs=2, val_check_interval=1)
    assert trainer.global_step == 4
    assert [int(r["step"]) for r in rows if "train/reward_mean" in r] == [2, 4]
    assert [int(r["step"]) for r in rows if "val/accuracy" in r] == [2, 4]
    assert not [r for r in rows if "epoch" in r]


TRAIN_SECONDS, VAL_SECONDS = 1.0, 1000.0  # what a training batch and a validation batch "take"


class FakeClock:
    """Stands in for the ``time`` module the step clock reads: ``perf_counter`` moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Ticks(L.Callback):
    """Advances the fake clock by known amounts: a training batch TRAIN_SECONDS, a validation batch
    VAL_SECONDS; counts each validation's batches."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.val_batches = clock, []

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.clock.now += TRAIN_SECONDS

    def on_validation_epoch_start(self, *args, **kwargs) -> None:
        self.val_batches.append(0)

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self.clock.now += VAL_SECONDS
        self.val_batches[-1] += 1


def test_step_time_excludes_validation_which_has_its_own_key(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No wall-clock comparison: the step clock reads a fake clock that each batch moves by a known amount."""
    clock = FakeClock()
    monkeypatch.setattr(step_metrics, "time", clock)
    ticks = Ticks(clock)
    _, rows = _fit(tmp_path, tiny_model_dir, [ticks], steps=4)
    validations = [r for r in rows if "time/val_s" in r]
    assert [int(r["step"]) for r in validations] == [2, 4] and all("val/accuracy" in r for r in validations)
    assert ticks.val_batches and min(ticks.val_batches) > 0
    assert [r["time/val_s"] for r in validations] == [VAL_SECONDS * n for n in ticks.val_batches]
    step_seconds = {int(r["step"]): r["time/step_s"] for r in rows if "time/step_s" in r}
    # each step is one training batch, step 3 too: the step-2 validation before it is not counted
    assert step_seconds == {2: TRAIN_SECONDS, 3: TRAIN_SECONDS, 4: TRAIN_SECONDS}


def test_progress_bar_counts_to_max_steps_and_shows_health(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    bar = CapoProgressBar()
    trainer, _ = _fit(
        tmp_path, tiny_model_dir, [bar, RejectionMonitor()], steps=4, ppo_epochs=2, selector=CAPOSelector(),
        val_check_interval=1, enable_progress_bar=True,
    )  # fmt: skip
    assert bar.train_progress_bar.total == 4 and bar.train_progress_bar.n == 4  # optimizer steps, not batches
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert set(shown) == {"reward", "acc", "rej"}
    assert float(shown["reward"]) == pytest.approx(float(trainer.callback_metrics["train/reward_mean"]), rel=1e-2)
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert "step: 100%" in console and "4/4" in console and "Epoch" not in console and "/-" not in console


def test_progress_bar_of_a_resumed_run_starts_at_its_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=2
    )
    _fit(tmp_path / "first", tiny_model_dir, [checkpoint], steps=2, enable_checkpointing=True)
    bar = CapoProgressBar(refresh_rate=3)
    _fit(
        tmp_path / "resumed", tiny_model_dir, [bar], steps=4, ckpt_path=str(tmp_path / "ckpt/last.ckpt"),
        enable_progress_bar=True, limit_val_batches=0,
    )  # fmt: skip
    assert (bar.train_progress_bar.initial, bar.train_progress_bar.n, bar.train_progress_bar.total) == (2, 4, 4)


def test_summary_reports_first_last_best_and_where_things_are(tmp_path: Path, tiny_model_dir: Path) -> None:
    summary = RunSummary()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)
    callbacks = [summary, checkpoint, ValidateBeforeTraining()]
    trainer, rows = _fit(tmp_path, tiny_model_dir, callbacks, steps=4, enable_checkpointing=True)
    text = summary.summary(trainer)
    rewards = [(int(r["step"]), r["train/reward_mean"]) for r in rows if "train/reward_mean" in r]
    best_step, best = max(rewards, key=lambda p: p[1])
    assert f"first {rewards[0][1]:.3g} (step 1)" in text and f"last {rewards[-1][1]:.3g} (step 4)" in text
    assert f"best {best:.3g} (step {best_step})" in text
    accuracy = [(int(r["step"]), r["val/accuracy"]) for r in rows if "val/accuracy" in r]
    assert f"first {accuracy[0][1]:.3g} (step 0)" in text
    assert str(tmp_path / "logs/version_0/metrics.csv") in text and "last.ckpt" in text
    assert f"capo report {tmp_path}" in text and "fit ended at step 4/4" in text


def test_completions_log_writes_rows_with_rewards_and_rejection_shares(tmp_path: Path, tiny_model_dir: Path) -> None:
    callbacks = [SelectionRecorder(str(tmp_path / "sel")), CompletionsLog(every_n_steps=2, rows=5)]
    _fit(tmp_path, tiny_model_dir, callbacks, steps=4, selector=CAPOSelector(), limit_val_batches=0)
    lines = (tmp_path / "logs/version_0/completions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [2] * 5 + [4] * 5
    for step in (2, 4):
        record = torch.load(tmp_path / f"sel/rank0_step{step}.pt")
        logged = [r for r in rows if r["step"] == step]
        assert [r["completion"] for r in logged] == record["completions"][:5]
        assert [r["reward"] for r in logged] == pytest.approx(record["rewards"][:5].tolist())
        assert [r["advantage"] for r in logged] == pytest.approx(record["advantages"][:5].tolist())
        judged = record["judged"][:5]
        rejected = judged & (record["failed"]["fisher"] | record["failed"]["hessian"])[:5]
        shares = (rejected.sum(1).float() / judged.sum(1).float()).tolist()
        assert [r["rejected_share"] for r in logged] == pytest.approx(shares)
        assert [r["tokens"] for r in logged] == judged.sum(1).tolist()


def test_baseline_validation_and_monitors_run_under_two_process_ddp(tmp_path: Path, tiny_model_dir: Path) -> None:
    callbacks = [ValidateBeforeTraining(), RejectionMonitor(), CompletionsLog(every_n_steps=1, rows=2)]
    _, rows = _fit(
        tmp_path, tiny_model_dir, callbacks, steps=2, selector=CAPOSelector(), strategy="ddp_spawn", devices=2
    )
    assert [int(r["step"]) for r in rows if "val/accuracy" in r] == [0, 2]
    assert [int(r["step"]) for r in rows if "select/tokens_judged" in r] == [1, 2]
    lines = (tmp_path / "logs/version_0/completions.jsonl").read_text().splitlines()
    assert len(lines) == 4  # rank zero's sample only, 2 rows x 2 steps


class _EpochMetrics(BoringModel):
    """Lightning's demo model, logging a training metric per step and per epoch and a validation metric."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train_loss", out["loss"], on_step=True, on_epoch=True)
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val_loss", out["x"])
        return out


def _boring_rows(root: Path, callbacks: list) -> list[dict[str, float]]:
    L.seed_everything(0)
    trainer = make_trainer(
        -1, callbacks, max_epochs=2, limit_train_batches=4, limit_val_batches=2, val_check_interval=2,
        num_sanity_val_steps=0, logger=CSVLogger(str(root), name="logs"), log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(_EpochMetrics())
    return read_csv_metrics(root / "logs")


def test_baseline_validation_leaves_training_step_and_epoch_metrics_unchanged(tmp_path: Path) -> None:
    """The baseline runs before any training batch, so the epoch accumulators it could disturb (what Lightning's
    ``_first_loop_iter`` restore guards in a mid-epoch validation) are untouched: the training rows, per step and
    per epoch, equal a run without it, also around the mid-epoch validations."""
    plain = _boring_rows(tmp_path / "plain", [])
    with_base = _boring_rows(tmp_path / "base", [ValidateBeforeTraining()])
    assert [r["step"] for r in with_base if "val_loss" in r] == [0] + [r["step"] for r in plain if "val_loss" in r]
    assert [r for r in with_base if "val_loss" not in r] == [r for r in plain if "val_loss" not in r]
    assert len([r for r in plain if "train_loss_step" in r]) == 8
    assert len([r for r in plain if "train_loss_epoch" in r]) == 2
