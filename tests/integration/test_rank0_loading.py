"""Rank-0 loading under FSDP2 (capo_lightning.scale.loading), on 2 CPU processes over gloo.

Each run is a script launched by Lightning's own launcher (``devices=2``), as ``capo fit`` would be. A
callback takes the state at ``on_fit_start``, after ``configure_model`` and Lightning's own setup: the
gathered parameters and buffers of the policy and of the KL reference, whether the embeddings are still
tied, logits on fixed ids, and how often each rank loaded weights or built the model files. The two ways of
loading (every rank reads the whole model; rank 0 reads it and hands out shards) must give bit-identical
models, and with rank-0 loading no other rank may read a weight. The training update under rank-0 loading
(the default) is checked against one process by tests/integration/test_fsdp.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import lightning as L
import torch
import capo_lightning.models.policy as policy_file
import capo_lightning.scale.loading as loading_file
from capo_lightning.module import CAPOModule
from capo_lightning.models.lora import LoraSpec
from capo_lightning.models.policy import PolicySpec
from capo_lightning.objectives import GRPO
from capo_lightning.scale.parallel import FSDP2Strategy, full_tensor
from tests.helpers import SGD, FixedBatches

CALLS = dict(load_policy=0, build_tiny_model=0)


def counted(name, function):
    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        return function(*args, **kwargs)
    return wrapper


loading_file.load_policy = counted("load_policy", loading_file.load_policy)
policy_file.build_tiny_model = counted("build_tiny_model", policy_file.build_tiny_model)


class Snapshot(L.Callback):
    def on_fit_start(self, trainer, module):
        policy, reference = module.policy, module.reference
        ids = torch.arange(1, 13).reshape(2, 6) % 50
        with torch.no_grad():
            logits = policy(input_ids=ids).logits
        model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        state = dict(
            params={{n: full_tensor(p.detach()).clone() for n, p in policy.named_parameters()}},
            buffers={{n: b.clone() for n, b in policy.named_buffers()}},
            reference={{n: full_tensor(p.detach()).clone() for n, p in reference.named_parameters()}},
            reference_buffers={{n: b.clone() for n, b in reference.named_buffers()}},
            reference_is_policy=reference is policy,
            trainable=sorted(n for n, p in policy.named_parameters() if p.requires_grad),
            tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            logits=logits, calls=dict(CALLS), rank=trainer.global_rank,
        )
        torch.save(state, {out!r} + f".rank{{trainer.global_rank}}")
        trainer.should_stop = True


if __name__ == "__main__":
    torch.manual_seed(0)
    module = CAPOModule(policy=PolicySpec({model!r}, cache_dir={cache!r}, lora={lora}), objective=GRPO(beta=0.1),
                        optimizer=SGD(0.0))
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                        strategy=FSDP2Strategy(param_dtype="float32", rank0_loading={rank0}),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot()])
    trainer.fit(module, train_dataloaders=FixedBatches([]))
"""


def _snapshots(tmp_path: Path, name: str, **kwargs) -> list[dict]:
    script = tmp_path / f"{name}.py"
    out = str(tmp_path / f"{name}.pt")
    script.write_text(SCRIPT.format(root=str(ROOT), out=out, **kwargs))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(f"{out}.rank{rank}", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("lora", [None, "LoraSpec(rank=2, target_modules=['q_proj'])"], ids=["full", "lora"])
def test_rank0_loading_builds_the_model_every_rank_loading_builds_and_only_rank0_reads_weights(
    tmp_path: Path, lora: str | None
) -> None:
    # a tiny model name not yet in this cache: its files are built during the run
    runs = {
        rank0: _snapshots(
            tmp_path, f"rank0_{rank0}", model="tiny:7", cache=str(tmp_path / f"cache_{rank0}"), lora=lora, rank0=rank0
        )
        for rank0 in (False, True)
    }  # fmt: skip
    everywhere, from_rank0 = runs[False], runs[True]
    # who read the weights: every rank, or rank 0 alone
    assert [s["calls"]["load_policy"] for s in everywhere] == [1, 1]
    assert [s["calls"]["load_policy"] for s in from_rank0] == [1, 0]
    # the model files are built once per node, by its local rank 0, in both ways of loading
    assert [s["calls"]["build_tiny_model"] for s in everywhere + from_rank0] == [1, 0, 1, 0]
    for rank in range(2):
        a, b = everywhere[rank], from_rank0[rank]
        assert b["tied"] and a["tied"]
        assert a["trainable"] == b["trainable"] and a["reference_is_policy"] == b["reference_is_policy"]
        assert b["reference_is_policy"] == (lora is not None)
        for key in ("params", "buffers", "reference", "reference_buffers"):
            assert a[key].keys() == b[key].keys() and a[key], key
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), f"rank {rank} {key} {name}"
        # the rotary inv_freq buffer (non-persistent, in no state dict) holds rank 0's values, not garbage
        assert any("inv_freq" in name for name in b["buffers"])
        assert torch.equal(a["logits"], b["logits"])
        # the reference starts as the policy
        for name, value in b["reference"].items():
            assert torch.equal(value, b["params"][name]), name
    # both ranks hold the same model
    for key in ("params", "buffers"):
        for name, value in from_rank0[0][key].items():
            assert torch.equal(value, from_rank0[1][key][name]), name


def test_rank0_loaded_logits_match_an_unsharded_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An independent check of the values: the sharded model rank 0 filled computes the logits that the
    model transformers loads from the same folder computes, on one process."""
    from capo_lightning.models.policy import PolicySpec, load_policy

    snapshots = _snapshots(
        tmp_path, "vs_plain", model=str(tiny_model_dir), cache=str(tmp_path / "cache"), lora=None, rank0=True
    )
    plain, _ = load_policy(PolicySpec(str(tiny_model_dir)))
    with torch.no_grad():
        expected = plain.eval()(input_ids=torch.arange(1, 13).reshape(2, 6) % 50).logits
    for snapshot in snapshots:
        torch.testing.assert_close(snapshot["logits"], expected, rtol=1e-5, atol=1e-6)
