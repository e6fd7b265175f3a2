"""FSDP2Strategy on 2 CPU processes (gloo), the same code paths a GPU run takes.

What runs: Lightning's ModelParallelStrategy (FSDP2Strategy) launching 2 processes, ``fully_shard`` per decoder
layer plus the root, DTensor parameters, the selector on the all-gathered LM head, gradient reduce-scatter,
clipping of DTensor gradients, the real rollout DataModule (HF generate on the sharded policy), and
distributed (per-rank shard) checkpoints. Each run is a script in its own process group, as
``capo fit --trainer.strategy=...`` would be.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from capo_lightning.commands.export import export_checkpoint
from capo_lightning.models.lora import LoraSpec
from capo_lightning.models.policy import PolicySpec, load_policy
from capo_lightning.module import CAPOModule
from capo_lightning.rollout.weights import merged_weights
from capo_lightning.scale.parallel import FSDP2Strategy, decoder_layers
from capo_lightning.selection import CAPOSelector
from tests.conftest import ROOT
from tests.helpers import SGD, FixedBatches, tiny_rollout

HEADER = """
import sys
sys.path.insert(0, {root!r})
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from capo_lightning.module import CAPOModule
from capo_lightning.scale.parallel import FSDP2Strategy, full_tensor
from capo_lightning.models.policy import PolicySpec
from transformers import AutoModelForCausalLM

from capo_lightning.commands.export import export_checkpoint
from capo_lightning.models.lora import LoraSpec
from capo_lightning.rollout.weights import merged_weights
from capo_lightning.selection import CAPOSelector
from tests.helpers import SGD, RankBatches, tiny_datamodule


class AdamW:
    def __call__(self, params):
        return torch.optim.AdamW(params, lr=1e-3)


class Count(L.Callback):
    steps = 0

    def on_train_batch_end(self, *args):
        Count.steps += 1


def finish(trainer, module, out):
    full = {{n: full_tensor(p.detach()).clone() for n, p in module.policy.named_parameters()}}
    kinds = {{type(p).__name__ for p in module.policy.parameters()}}
    streamed = dict(merged_weights(module.policy))  # what VLLMEngine pushes: one all-gather per entry, in order
    if trainer.global_rank == 0:
        torch.save(dict(params=full, kinds=kinds, steps=Count.steps, selector=module.selector.state_dict(),
                        streamed=streamed), out)
"""

UPDATE = """
if __name__ == "__main__":
    halves = torch.load({batches!r}, weights_only=False)
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec({model!r}, gradient_checkpointing={checkpointing!r}, lora={lora}),
                        selector=CAPOSelector(delta_f=1e9, tau_h=1e9), optimizer=SGD(0.1), max_grad_norm=None)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(param_dtype="float32"), max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Count()])
    trainer.fit(module, train_dataloaders=RankBatches(halves))
    finish(trainer, module, {out!r})
"""

RESUME = """
if __name__ == "__main__":
    resume = {resume!r}
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec({model!r}, lora={lora}), selector=CAPOSelector(delta_f=1e-2, tau_h=1e-1),
                        optimizer=AdamW())
    checkpoint = ModelCheckpoint(dirpath={ckdir!r}, save_top_k=-1, every_n_train_steps=1, filename="{{step}}")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=2, logger=False,
                        callbacks=[checkpoint, Count()], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir={ckdir!r})
    trainer.fit(module, datamodule=tiny_datamodule(), ckpt_path=resume)
    finish(trainer, module, {out!r})
"""


def _run(tmp_path: Path, name: str, body: str, **kwargs) -> dict:
    script = tmp_path / f"{name}.py"
    out = str(tmp_path / f"{name}.pt")
    script.write_text(HEADER.format(root=str(ROOT)) + body.format(out=out, **kwargs))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_two_fsdp2_processes_make_the_update_of_one_process(
    tiny_model_dir: Path, tmp_path: Path, checkpointing: bool
) -> None:
    batch = tiny_rollout(tiny_model_dir, num_prompts=4)  # 4 groups of 4: two groups per rank
    halves = [batch.select(torch.nonzero(batch.group_ids // 2 == r).squeeze(1)) for r in range(2)]
    torch.save(halves, tmp_path / "halves.pt")
    sharded = _run(
        tmp_path, "update", UPDATE, batches=str(tmp_path / "halves.pt"), model=str(tiny_model_dir),
        checkpointing=checkpointing, lora=None,
    )  # fmt: skip
    assert sharded["kinds"] == {"DTensor"} and sharded["steps"] == 1
    # the vLLM weight stream gathers whole, plain tensors under the policy's own names
    assert set(sharded["params"]) <= set(sharded["streamed"])
    for name, value in sharded["params"].items():
        assert type(sharded["streamed"][name]) is torch.Tensor and torch.equal(sharded["streamed"][name], value)
    torch.manual_seed(0)
    single = CAPOModule(
        policy=PolicySpec(str(tiny_model_dir)), selector=CAPOSelector(delta_f=1e9, tau_h=1e9), optimizer=SGD(0.1),
        max_grad_norm=None,
    )  # fmt: skip
    L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(single, train_dataloaders=FixedBatches([batch]))  # fmt: skip
    start = dict(load_policy(PolicySpec(str(tiny_model_dir)))[0].named_parameters())
    for name, param in single.policy.named_parameters():
        update = (param.detach() - start[name].detach()).abs().max()
        assert update > 0, name
        gap = (sharded["params"][name] - param.detach()).abs().max()
        assert gap <= 1e-3 * update, f"{name}: FSDP2 and one process differ by {gap:.3g} on an update of {update:.3g}"
    for key in ("adam_m", "adam_v"):  # the selector saw the full LM head and all ranks' tokens
        torch.testing.assert_close(sharded["selector"][key], single.selector.state_dict()[key], rtol=1e-4, atol=1e-8)


def test_a_lora_policy_under_fsdp2_makes_the_update_of_one_process_and_streams_merged_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """LoRA + CAPO (trained head) on 2 FSDP2 processes: adapters and head are sharded DTensors like the base;
    the update equals one process's, and the weight stream VLLMEngine pushes is that policy merged."""
    batch = tiny_rollout(tiny_model_dir, num_prompts=4)
    halves = [batch.select(torch.nonzero(batch.group_ids // 2 == r).squeeze(1)) for r in range(2)]
    torch.save(halves, tmp_path / "halves.pt")
    lora = LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"], train_head=True)
    sharded = _run(
        tmp_path, "update", UPDATE, batches=str(tmp_path / "halves.pt"), model=str(tiny_model_dir),
        checkpointing=False, lora=repr(lora),
    )  # fmt: skip
    assert sharded["kinds"] == {"DTensor"} and sharded["steps"] == 1
    torch.manual_seed(0)
    single = CAPOModule(
        policy=PolicySpec(str(tiny_model_dir), lora=lora), selector=CAPOSelector(delta_f=1e9, tau_h=1e9),
        optimizer=SGD(0.1), max_grad_norm=None,
    )  # fmt: skip
    L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(single, train_dataloaders=FixedBatches([batch]))  # fmt: skip
    assert any("lora_B" in name and param.abs().max() > 0 for name, param in single.policy.named_parameters())
    for name, param in single.policy.named_parameters():
        gap = (sharded["params"][name] - param.detach()).abs().max()
        assert gap <= 1e-6 + 1e-3 * param.detach().abs().max(), f"{name}: FSDP2 and one process differ by {gap:.3g}"
    merged = dict(merged_weights(single.policy))
    assert merged.keys() == sharded["streamed"].keys() and not any("lora" in name for name in merged)
    for name, value in merged.items():
        assert type(sharded["streamed"][name]) is torch.Tensor
        torch.testing.assert_close(sharded["streamed"][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_sharded_checkpoint_resumes_exactly_and_exports(tiny_model_dir: Path, tmp_path: Path, lora: bool) -> None:
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], train_head=True) if lora else None
    args = dict(model=str(tiny_model_dir), lora=repr(spec))
    ckdir = tmp_path / "checkpoints"
    straight = _run(tmp_path, "straight", RESUME, resume=None, ckdir=str(ckdir), **args)
    assert straight["steps"] == 2
    first = ckdir / "step=1.ckpt"
    assert first.is_dir() and sorted(p.name for p in first.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    saved = [
        k
        for k in FileSystemReader(str(first)).read_metadata().state_dict_metadata
        if k.startswith("state_dict.policy.")
    ]
    if lora:  # the shards hold the adapters and, for Lightning's sharded loader, the frozen base too
        assert any("lora_B" in k for k in saved) and any("base_layer" in k for k in saved), saved
    resumed = _run(tmp_path, "resumed", RESUME, resume=str(first), ckdir=str(tmp_path / "again"), **args)
    assert resumed["steps"] == 1  # only step 2 ran: weights, AdamW moments, selector and data came from the shards
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    for key, value in straight["selector"].items():
        assert torch.equal(resumed["selector"][key], value), key
    assert int(straight["selector"]["adam_step"]) == 2
    # capo export reads the sharded folder directly (in this one process): the weights the run ended with, merged
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(ckdir / "step=2.ckpt", tmp_path / "hf"))
    assert exported.state_dict().keys() == straight["streamed"].keys()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, straight["streamed"][name], rtol=0, atol=1e-6 if lora else 0, msg=name)


def test_fsdp2_strategy_settings_and_the_layers_it_shards(tiny_model_dir: Path) -> None:
    policy, _ = load_policy(PolicySpec(str(tiny_model_dir)))
    assert decoder_layers(policy) == list(policy.model.layers)
    strategy = FSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32")
    assert (strategy.param_dtype, strategy.reduce_dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="param_dtype"):
        FSDP2Strategy(param_dtype="bf16")
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    # a PEFT model: the layers of the model it wraps
    lora_policy, _ = load_policy(PolicySpec(str(tiny_model_dir), lora=LoraSpec(rank=2, target_modules=["q_proj"])))
    assert decoder_layers(lora_policy) == list(lora_policy.get_base_model().model.layers)
