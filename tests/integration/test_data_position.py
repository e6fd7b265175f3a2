"""The DataModule owns the data position: it checkpoints it, restores it, and reads old checkpoints.

1. ``RolloutDataModule.state_dict``/``load_state_dict`` round trip: a DataModule restored from another's state
   makes the very batch the other would make next;
2. a fit resumed from a checkpoint continues with exactly the batches of an uninterrupted run, from the
   DataModule's own checkpoint entry and from a checkpoint written before it existed (only the module's
   ``capo_state["rollout_step"]``), whichever order Lightning calls the load hooks in;
3. a batch made but never trained on (the run stopped before its training step returned) is not counted, so
   a resume from the interrupted run's checkpoint replays it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from capo_lightning.callbacks import InterruptCheckpoint
from capo_lightning.data.datamodule import RolloutDataModule
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from tests.helpers import BatchRecorder, make_trainer, read_records, tiny_datamodule
from tests.integration.test_module import adamw

KEY = RolloutDataModule.__qualname__  # where Lightning keeps the DataModule's state in a checkpoint


def _fit(model_dir: Path, steps: int, records: Path, ckdir: Path | None = None, ckpt_path: str | None = None):
    """A fit of ``steps`` optimizer steps with the tests' DataModule, recording each batch it trained on."""
    callbacks: list = [BatchRecorder(str(records))]
    if ckdir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckdir, save_last=True, save_top_k=0))
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec(str(model_dir)), optimizer=adamw)
    datamodule = tiny_datamodule()
    trainer = make_trainer(steps, callbacks, enable_checkpointing=ckdir is not None)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, datamodule


def test_state_dict_round_trip_resumes_the_stream_at_the_same_batch(tiny_model_dir: Path) -> None:
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)))
    module.configure_model()
    first, second = tiny_datamodule(), tiny_datamodule()
    for dm in (first, second):
        dm.connect(module.engine, module.tokenizer)
    stream = iter(first.train_dataloader())
    batches = [next(stream) for _ in range(3)]
    assert [b.rollout_step for b in batches] == [0, 1, 2]
    assert first.state_dict() == {"train_batches": 3}  # no Trainer: every batch handed out counts
    first.load_state_dict({"train_batches": 1})
    second.load_state_dict(first.state_dict())
    again, other = next(iter(first.train_dataloader())), next(iter(second.train_dataloader()))
    assert again.rollout_step == other.rollout_step == 1
    assert again.texts.prompts == other.texts.prompts == batches[1].texts.prompts
    assert again.texts.completions == other.texts.completions == batches[1].texts.completions  # same seed


def test_a_resumed_fit_continues_with_the_batches_of_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    _fit(tiny_model_dir, 3, tmp_path / "straight.jsonl")
    _fit(tiny_model_dir, 2, tmp_path / "first.jsonl", ckdir=tmp_path / "ckpt")
    last = tmp_path / "ckpt/last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint[KEY] == {"train_batches": 2} and checkpoint["capo_state"]["rollout_step"] == 2
    resumed, datamodule = _fit(tiny_model_dir, 3, tmp_path / "resumed.jsonl", ckpt_path=str(last))
    full, cont = read_records(tmp_path / "straight.jsonl"), read_records(tmp_path / "resumed.jsonl")
    assert [(r["global_step"], r["rollout_step"]) for r in cont] == [(2, 2)]
    assert cont[0]["prompts"] == full[2]["prompts"] and cont[0]["completions"] == full[2]["completions"]
    assert datamodule.position.batches == resumed.rollout_step == 3


def test_a_checkpoint_from_before_the_datamodule_kept_its_position_still_resumes_exactly(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    _fit(tiny_model_dir, 3, tmp_path / "straight.jsonl")
    _fit(tiny_model_dir, 2, tmp_path / "first.jsonl", ckdir=tmp_path / "ckpt")
    checkpoint = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    del checkpoint[KEY]  # exactly the old format: the position only as the module's capo_state["rollout_step"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    _, datamodule = _fit(tiny_model_dir, 3, tmp_path / "resumed.jsonl", ckpt_path=str(tmp_path / "old.ckpt"))
    full, cont = read_records(tmp_path / "straight.jsonl"), read_records(tmp_path / "resumed.jsonl")
    assert [(r["global_step"], r["rollout_step"]) for r in cont] == [(2, 2)]
    assert cont[0]["prompts"] == full[2]["prompts"] and cont[0]["completions"] == full[2]["completions"]
    assert datamodule.position.batches == 3


def test_the_legacy_position_applies_only_without_the_datamodules_own_entry(tiny_model_dir: Path) -> None:
    """Lightning loads the DataModule's entry after the module's hook in fit, before it in ``restore()``: the
    module's hand-over must not overwrite the entry in either order."""
    dm = tiny_datamodule()
    dm.load_state_dict({"train_batches": 4})  # the entry, loaded first (``restore()`` order)
    dm.restore_legacy_position({KEY: {"train_batches": 4}, "capo_state": {"rollout_step": 9}}, trained_batches=9)
    assert dm.position.batches == 4
    dm.restore_legacy_position({"capo_state": {"rollout_step": 9}}, trained_batches=9)  # an old checkpoint
    assert dm.position.batches == 9


class _StopsInTransfer(CAPOModule):
    """Stops the run (Ctrl-C) while the third batch moves to the device: it was made but never trained on."""

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer.training and self.trainer.global_step == 2:
            raise KeyboardInterrupt
        return batch


def test_a_batch_made_but_not_trained_on_is_replayed_on_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    _fit(tiny_model_dir, 3, tmp_path / "straight.jsonl")
    torch.manual_seed(0)
    datamodule, ckdir = tiny_datamodule(), tmp_path / "ckpt"
    trainer = make_trainer(3, [InterruptCheckpoint(str(ckdir))], default_root_dir=tmp_path, enable_checkpointing=True)
    try:
        trainer.fit(_StopsInTransfer(policy=PolicySpec(str(tiny_model_dir)), optimizer=adamw), datamodule=datamodule)
    except (KeyboardInterrupt, SystemExit):
        pass
    assert datamodule.position.batches == 3  # the third batch was made ...
    checkpoint = torch.load(ckdir / InterruptCheckpoint.FILENAME, weights_only=False)
    assert checkpoint[KEY] == {"train_batches": 2}  # ... but the checkpoint counts only the two trained on
    _fit(tiny_model_dir, 3, tmp_path / "resumed.jsonl", ckpt_path=str(ckdir / InterruptCheckpoint.FILENAME))
    full, cont = read_records(tmp_path / "straight.jsonl"), read_records(tmp_path / "resumed.jsonl")
    assert [(r["global_step"], r["rollout_step"]) for r in cont] == [(2, 2)]
    assert cont[0]["prompts"] == full[2]["prompts"] and cont[0]["completions"] == full[2]["completions"]
