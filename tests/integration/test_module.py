"""One real training step of CAPOModule on the tiny model, through a real Lightning Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.objectives import GRPO
from capo_lightning.selection import KeepAll
from capo_lightning.training.optim import WarmupCosineLR
from tests.helpers import (
    BatchRecorder,
    FixedBatches,
    make_trainer,
    read_records,
    tiny_datamodule,
    tiny_rollout,
)


def make_datamodule(**overrides) -> RolloutDataModule:
    return tiny_datamodule(**overrides)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def test_training_step_changes_every_policy_parameter_and_not_the_reference(tiny_model_dir: Path) -> None:
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), objective=GRPO(beta=0.1), optimizer=adamw)
    module.configure_model()
    assert module.reference is not None
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in module.reference.named_parameters()}
    make_trainer(1).fit(module, datamodule=make_datamodule())
    unchanged = [n for n, p in module.policy.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters the step did not update: {unchanged}"
    for n, p in module.reference.named_parameters():
        assert torch.equal(p, ref_before[n]), n
        assert not p.requires_grad
    # the reference is neither a registered child nor in the checkpointed state
    assert not any(k.startswith("_reference") for k in module.state_dict())


def test_optimizer_holds_only_policy_parameters(tiny_model_dir: Path) -> None:
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), objective=GRPO(beta=0.1), optimizer=adamw)
    trainer = make_trainer(1)
    trainer.fit(module, datamodule=make_datamodule())
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    policy_ids = {id(p) for p in module.policy.parameters()}
    assert held == policy_ids
    assert not held & {id(p) for p in module.reference.parameters()}


def test_no_reference_model_when_beta_is_zero(tiny_model_dir: Path) -> None:
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), objective=GRPO(beta=0.0))
    module.configure_model()
    assert module.reference is None


def _one_step(model_dir: Path, selector, batch) -> tuple[dict, dict]:
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec(str(model_dir)), selector=selector, optimizer=adamw)
    trainer = make_trainer(1)
    trainer.fit(module, train_dataloaders=FixedBatches([batch]))
    params = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    return params, {k: v.clone() for k, v in trainer.callback_metrics.items()}


def test_keep_all_is_bit_identical_to_no_selector(tiny_model_dir: Path) -> None:
    batch = tiny_rollout(tiny_model_dir, num_prompts=2, temperature=0.9)
    params_none, metrics_none = _one_step(tiny_model_dir, None, batch)
    params_keep, metrics_keep = _one_step(tiny_model_dir, KeepAll(), batch)
    assert metrics_none["objective/loss"].item() == metrics_keep["objective/loss"].item()
    assert metrics_none["objective/grad_norm"].item() == metrics_keep["objective/grad_norm"].item()
    assert metrics_none["objective/grad_norm"].item() > 0
    for name, value in params_none.items():
        assert torch.equal(value, params_keep[name]), name


def test_rollouts_come_from_the_weights_that_train_on_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = tmp_path / "batches.jsonl"
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw)
    trainer = make_trainer(4, callbacks=[BatchRecorder(str(records))])
    trainer.fit(module, datamodule=make_datamodule())
    seen = read_records(records)
    assert [r["global_step"] for r in seen] == [0, 1, 2, 3]
    assert [r["policy_version"] for r in seen] == [0, 1, 2, 3]  # staleness 0
    assert trainer.callback_metrics["rollout/staleness"].item() == 0.0
    # behaviour logprobs (sampling time) equal the trainer's logprobs of the same weights
    assert trainer.callback_metrics["rollout/engine_trainer_logprob_gap"].item() < 1e-4


def test_nan_loss_skips_the_step_and_keeps_weights(tiny_model_dir: Path) -> None:
    def nan_reward(completions, answers, **_):
        return [float(i % 2) for i in range(len(completions))]

    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    # poison the objective: a NaN advantage turns the loss into NaN
    module.objective.advantages = lambda rewards, group_ids: torch.full_like(rewards, float("nan"))
    trainer = make_trainer(2)
    trainer.fit(module, datamodule=make_datamodule(reward_fn=nan_reward))
    assert trainer.global_step == 2  # skipped steps still count, so the run ends
    assert module.skipped_steps == 2
    assert trainer.callback_metrics["objective/skipped_steps"].item() == 2.0
    for n, p in module.policy.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("ppo_epochs,minibatches,micro", [(2, 1, None), (1, 2, 2), (1, 1, 3)])
def test_multi_pass_paths_train_and_ratio_departs_from_one(
    tiny_model_dir: Path, ppo_epochs, minibatches, micro
) -> None:
    module = CAPOModule(
        policy=PolicySpec(str(tiny_model_dir)),
        optimizer=adamw,
        ppo_epochs=ppo_epochs,
        minibatches=minibatches,
        micro_batch_size=micro,
    )
    trainer = make_trainer(1)
    trainer.fit(module, datamodule=make_datamodule())
    assert trainer.global_step == ppo_epochs * minibatches
    ratio = trainer.callback_metrics["objective/ratio_mean"].item()
    if ppo_epochs * minibatches > 1:
        assert ratio != 1.0  # later updates see weights that already moved
    else:
        assert ratio == pytest.approx(1.0, abs=1e-6)


def test_a_run_of_non_finite_steps_stops_with_a_clear_error(tiny_model_dir: Path) -> None:
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw, max_consecutive_skips=3)
    module.configure_model()
    module.objective.advantages = lambda rewards, group_ids: torch.full_like(rewards, float("inf"))
    with pytest.raises(FloatingPointError, match="max_consecutive_skips"):
        make_trainer(10).fit(module, datamodule=make_datamodule())
    assert module.skipped_steps == 3


class _InterruptAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_leaves_a_checkpoint_that_resumes_at_the_same_data(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from capo_lightning.callbacks import InterruptCheckpoint

    ckdir = tmp_path / "checkpoints"
    straight = tmp_path / "straight.jsonl"
    make_trainer(3, callbacks=[BatchRecorder(str(straight))]).fit(
        CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw), datamodule=make_datamodule()
    )
    try:
        L.Trainer(
            accelerator="cpu",
            max_steps=3,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=tmp_path,
            callbacks=[InterruptCheckpoint(str(ckdir)), _InterruptAt(2)],
        ).fit(CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw), datamodule=make_datamodule())
    except (KeyboardInterrupt, SystemExit):
        pass
    assert (ckdir / "last-interrupted.ckpt").exists()
    resumed = tmp_path / "resumed.jsonl"
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=ckdir, save_last=True, save_top_k=0), BatchRecorder(str(resumed))],
    )
    trainer.fit(
        CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw),
        datamodule=make_datamodule(),
        ckpt_path="last",
    )
    full, cont = read_records(straight), read_records(resumed)
    assert [r["global_step"] for r in cont] == [2]
    assert cont[0]["prompts"] == full[2]["prompts"]
    assert cont[0]["completions"] == full[2]["completions"]


def test_mask_truncated_drops_truncated_completions_from_the_loss(tiny_model_dir: Path) -> None:
    from capo_lightning.objectives import DAPO

    batch = tiny_rollout(tiny_model_dir, num_prompts=4, max_new_tokens=6, temperature=0.9, seed=1)
    # the random tiny model rarely stops by itself: flag every other row as finished instead

    batch = batch.replace(truncated=torch.arange(batch.num_completions) % 2 == 0)
    seen = {}
    for flag in (False, True):
        module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), objective=DAPO(), mask_truncated=flag)
        trainer = make_trainer(1)
        trainer.fit(module, train_dataloaders=FixedBatches([batch]))
        seen[flag] = trainer.callback_metrics["objective/normalizer"].item()
    # DAPO's denominator is the number of kept tokens: all response tokens, or those of finished rows only
    assert seen[False] == float(batch.response_mask.sum())
    assert seen[True] == float((batch.response_mask & ~batch.truncated.unsqueeze(1)).sum())


def test_a_cosine_schedule_without_max_steps_is_refused_by_name(tiny_model_dir: Path) -> None:
    # max_steps unset (-1) used to give a one-step schedule: the lr fell to its floor after the first step
    module = CAPOModule(
        policy=PolicySpec(str(tiny_model_dir)), objective=GRPO(), optimizer=adamw, lr_scheduler=WarmupCosineLR
    )
    with pytest.raises(ValueError, match=r"trainer.max_steps is -1: set --trainer.max_steps"):
        make_trainer(-1, max_epochs=1).fit(module, datamodule=make_datamodule())
    fixed = CAPOModule(
        policy=PolicySpec(str(tiny_model_dir)),
        objective=GRPO(),
        optimizer=adamw,
        lr_scheduler=lambda opt: WarmupCosineLR(opt, total_steps=8),
    )
    trainer = make_trainer(-1, max_epochs=1, limit_train_batches=2)
    trainer.fit(fixed, datamodule=make_datamodule())
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 8


def test_reference_logprobs_in_micro_batches_equal_the_one_shot_forward(tiny_model_dir: Path) -> None:
    from capo_lightning.models.forward import score_responses
    from capo_lightning.models.policy import load_policy
    from capo_lightning.training.passes import reference_logprobs

    batch = tiny_rollout(tiny_model_dir, num_prompts=3)  # 12 rows: micro-batches of 5, 5 and 2
    reference, _ = load_policy(PolicySpec(str(tiny_model_dir)))
    reference.eval()
    whole = reference_logprobs(reference, batch)
    parts = reference_logprobs(reference, batch, micro_batch_size=5)
    valid = batch.response_mask  # padding positions hold no logprob (a forward may cut them)
    torch.testing.assert_close(parts[valid], whole[valid], rtol=0, atol=1e-6)
    with torch.no_grad():  # and each row is that row's own forward
        row = score_responses(reference, batch.input_ids[7:8], batch.attention_mask[7:8], batch.response_mask.shape[1])
    torch.testing.assert_close(parts[7][valid[7]], row.logprobs[0][valid[7]], rtol=0, atol=1e-6)
    assert parts.shape == batch.response_mask.shape
