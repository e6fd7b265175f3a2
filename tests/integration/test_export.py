"""``capo export``: a trained checkpoint out as a Hugging Face folder whose logprobs are the trained policy's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from capo_lightning.commands.cli import main
from capo_lightning.commands.export import export_checkpoint
from capo_lightning.models.forward import score_responses
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from tests.helpers import SGD, FixedBatches, make_trainer, tiny_rollout


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real fit step on the tiny model, saved as a Lightning checkpoint."""
    batch = tiny_rollout(tiny_model_dir, num_prompts=2)
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=SGD(1.0), max_grad_norm=None)
    trainer = make_trainer(1)
    trainer.fit(module, train_dataloaders=FixedBatches([batch]))
    ckpt = tmp_path_factory.mktemp("export") / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"module": module, "batch": batch, "ckpt": ckpt}


def _logprobs(model: torch.nn.Module, batch) -> torch.Tensor:  # noqa: ANN001
    model.eval()
    with torch.no_grad():
        out = score_responses(model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
    return out.logprobs[batch.response_mask]


def test_exported_folder_scores_like_the_trained_policy(trained: dict, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    main(["export", "--ckpt_path", str(trained["ckpt"]), "--out", str(out)])
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    batch = trained["batch"]
    want = _logprobs(trained["module"].policy, batch)
    torch.testing.assert_close(_logprobs(exported, batch), want, rtol=0, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert (_logprobs(base, batch) - want).abs().max() > 1e-3  # training moved the policy: the check is not vacuous
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == original.chat_template and saved("1+2=").input_ids == original("1+2=").input_ids
    assert (out / "generation_config.json").exists()


def test_missing_or_corrupt_checkpoints_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(missing), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and str(missing) in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(corrupt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert str(corrupt) in err and "not a readable checkpoint" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert str(folder) in err and "not a sharded capo fit checkpoint" in err


def test_an_old_checkpoint_without_its_policy_needs_and_takes_policy(
    trained: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    del checkpoint["capo_state"]["policy"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.raises(ValueError, match="--policy"):
        export_checkpoint(old, tmp_path / "a")
    out = export_checkpoint(old, tmp_path / "b", policy=str(tiny_model_dir))
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(
        _logprobs(exported, trained["batch"]), _logprobs(trained["module"].policy, trained["batch"]), rtol=0, atol=1e-6
    )
