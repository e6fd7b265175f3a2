"""LoRA policies through PEFT on the tiny model: what trains, the adapters-off reference, checkpoints, CAPO, export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from capo_lightning.commands.export import export_checkpoint
from capo_lightning.models.forward import score_responses
from capo_lightning.models.lora import LoraSpec, adapters_off
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.objectives import GRPO
from capo_lightning.rollout.weights import merged_weights
from capo_lightning.selection import CAPOSelector
from capo_lightning.training.passes import reference_logprobs
from tests.helpers import SGD, FixedBatches, make_trainer, tiny_rollout

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"])


@pytest.fixture(scope="module")
def batch(tiny_model_dir: Path):  # noqa: ANN201
    return tiny_rollout(tiny_model_dir, num_prompts=2)


def _module(model_dir: Path, lora: LoraSpec | None = LORA, **kwargs) -> CAPOModule:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", SGD(1.0))
    module = CAPOModule(policy=PolicySpec(str(model_dir), lora=lora), max_grad_norm=None, **kwargs)
    module.configure_model()
    return module


def _params(module: CAPOModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.policy.named_parameters()}


def _base_logprobs(model_dir: Path, batch) -> torch.Tensor:  # noqa: ANN001
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = score_responses(base, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
    return out.logprobs[batch.response_mask]


@pytest.mark.parametrize("train_head", [False, True])
def test_a_lora_fit_moves_only_adapters_and_the_configured_head(tiny_model_dir: Path, batch, train_head: bool) -> None:
    lora = LoraSpec(**{**LORA.__dict__, "train_head": train_head})
    module = _module(tiny_model_dir, lora)
    before = _params(module)
    trainer = make_trainer(1)
    trainer.fit(module, train_dataloaders=FixedBatches([batch]))
    after = _params(module)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all("lora_" in name or "lm_head" in name or "embed_tokens" in name for name in moved)
    assert any("lora_B" in name for name in moved)  # B starts at 0: the first step moves it
    head_moved = any("lm_head" in name or "embed_tokens" in name for name in moved)
    assert head_moved == train_head
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    trainable = {id(p) for p in module.policy.parameters() if p.requires_grad}
    assert optimizer_params == trainable and len(trainable) < len(list(module.policy.parameters())) / 2


def test_the_reference_is_the_policy_with_adapters_off_and_scores_as_the_base_model(
    tiny_model_dir: Path, batch
) -> None:
    module = _module(tiny_model_dir, objective=GRPO(beta=0.1))
    make_trainer(1).fit(module, train_dataloaders=FixedBatches([batch]))
    assert module.reference is module.policy  # no second model in memory
    held = {p.data_ptr() for p in module.parameters()} | {p.data_ptr() for p in module.reference.parameters()}
    assert len(held) == len({p.data_ptr() for p in module.policy.parameters()})
    ref = reference_logprobs(module.reference, batch)[batch.response_mask]
    torch.testing.assert_close(ref, _base_logprobs(tiny_model_dir, batch), rtol=0, atol=0)
    with torch.no_grad():  # the adapters are back on afterwards, and they moved the policy
        on = score_responses(module.policy, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
    assert (on.logprobs[batch.response_mask] - ref).abs().max() > 1e-4


def test_a_lora_checkpoint_holds_only_what_trains_and_resumes_exactly(
    tiny_model_dir: Path, batch, tmp_path: Path
) -> None:
    def fit(module: CAPOModule, steps: int, ckpt: Path | None = None) -> L.Trainer:  # noqa: F821
        trainer = make_trainer(steps)
        trainer.fit(module, train_dataloaders=FixedBatches([batch] * steps), ckpt_path=ckpt)
        return trainer

    full = _module(tiny_model_dir, lora=None)
    fit(full, 1).save_checkpoint(tmp_path / "full.ckpt")
    first = _module(tiny_model_dir)
    fit(first, 1).save_checkpoint(tmp_path / "lora.ckpt")
    assert (tmp_path / "lora.ckpt").stat().st_size < 0.5 * (tmp_path / "full.ckpt").stat().st_size
    keys = torch.load(tmp_path / "lora.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert keys and all("lora_" in k for k in keys if k.startswith("policy."))
    straight = _module(tiny_model_dir)
    fit(straight, 2)
    resumed = _module(tiny_model_dir)
    fit(resumed, 2, ckpt=tmp_path / "lora.ckpt")
    for name, value in _params(straight).items():
        assert torch.equal(_params(resumed)[name], value), name


def test_capo_with_lora_needs_a_trained_head(tiny_model_dir: Path, batch) -> None:
    with pytest.raises(ValueError, match="train_head"):
        _module(tiny_model_dir, selector=CAPOSelector(top_k=8))
    module = _module(tiny_model_dir, LoraSpec(**{**LORA.__dict__, "train_head": True}), selector=CAPOSelector(top_k=8))
    make_trainer(1).fit(module, train_dataloaders=FixedBatches([batch]))
    assert int(module.selector.adam_step) == 1


@pytest.mark.parametrize("train_head", [False, True])
def test_the_merged_weight_stream_equals_peft_merge_and_leaves_the_policy_unchanged(
    tiny_model_dir: Path, batch, train_head: bool
) -> None:
    """What VLLMEngine pushes after a LoRA step: the weights PEFT's merge_and_unload would give (computed by PEFT,
    on a copy), under the base model's names, and a fresh base model loaded with them scores as the policy."""
    module = _module(tiny_model_dir, LoraSpec(**{**LORA.__dict__, "train_head": train_head}))
    make_trainer(1).fit(module, train_dataloaders=FixedBatches([batch]))
    before = {name: t.clone() for name, t in module.policy.state_dict().items()}
    streamed = dict(merged_weights(module.policy))
    for name, value in module.policy.state_dict().items():
        assert torch.equal(value, before[name]), name  # nothing merged in place: the base stays exact
    want = copy.deepcopy(module.policy).merge_and_unload().state_dict()
    assert streamed.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(streamed[name], value, rtol=1e-6, atol=1e-7, msg=name)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base = {name: t.clone() for name, t in fresh.state_dict().items()}
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(streamed[q_proj], base[q_proj])  # the adapters' update is in the stream
    fresh.load_state_dict(streamed)
    length = batch.response_mask.shape[1]
    with torch.no_grad():
        got = score_responses(fresh, batch.input_ids, batch.attention_mask, length).logprobs[batch.response_mask]
        policy = score_responses(module.policy, batch.input_ids, batch.attention_mask, length)
    torch.testing.assert_close(got, policy.logprobs[batch.response_mask], rtol=0, atol=1e-5)
    with adapters_off(module.policy):  # adapters switched off: the stream is the base model's weights
        off = dict(merged_weights(module.policy))
    changed = {name for name, value in base.items() if not torch.equal(off[name], value)}
    assert changed == ({"lm_head.weight", "model.embed_tokens.weight"} & base.keys() if train_head else set())


def test_export_merges_the_adapters(tiny_model_dir: Path, batch, tmp_path: Path) -> None:
    module = _module(tiny_model_dir)
    trainer = make_trainer(1)
    trainer.fit(module, train_dataloaders=FixedBatches([batch]))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    out = export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    with torch.no_grad():
        got = score_responses(exported, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
        want = score_responses(module.policy, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
    torch.testing.assert_close(got.logprobs[batch.response_mask], want.logprobs[batch.response_mask], rtol=0, atol=1e-5)
