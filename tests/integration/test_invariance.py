"""Invariances of one CAPOModule step on the tiny model, through a real Lightning Trainer.

The gradient of one optimizer step must not depend on how its rows are cut into micro-batches
(fused single pass vs. the two-pass path with a no-grad pass for old logprobs) nor on how they are
spread over DDP ranks. The optimizer is plain SGD, whose update is exactly -lr * gradient, so a wrong
normaliser (a factor of 2 from micro-batches or ranks) shows up in the update; Adam's first step
(~ -lr * sign(g)) would hide it. Also: multi-pass steps really clip, and inert settings warn at startup.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from capo_lightning.models.lora import LoraSpec
from capo_lightning.models.policy import PolicySpec
from capo_lightning.module import CAPOModule
from capo_lightning.objectives import DAPO, GRPO, REINFORCE, DrGRPO
from capo_lightning.training.result import step_result
from tests.helpers import SGD, FixedBatches, RankBatches, make_trainer, tiny_rollout

OBJECTIVES = {"GRPO": GRPO, "DrGRPO": DrGRPO, "DAPO": DAPO, "REINFORCE": REINFORCE}


def _module(model_dir: Path, objective: str = "GRPO", lr: float = 1.0, **kwargs) -> CAPOModule:
    kwargs.setdefault("max_grad_norm", None)
    kwargs.setdefault("policy", PolicySpec(str(model_dir)))
    return CAPOModule(objective=OBJECTIVES[objective](), optimizer=SGD(lr), **kwargs)


def _flat(module: CAPOModule) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.policy.parameters()])


def _train(
    model_dir: Path,
    batches,
    objective: str = "GRPO",
    lr: float = 1.0,
    trainer_kwargs: dict | None = None,
    **module_kwargs,
) -> tuple[torch.Tensor, dict, CAPOModule]:
    """One fit on ``batches`` from fresh weights; returns (flat parameter update, callback metrics, module)."""
    torch.manual_seed(0)
    module = _module(model_dir, objective, lr, **module_kwargs)
    module.configure_model()  # before fit: ddp_spawn copies rank-0 weights back only into an existing policy
    before = _flat(module)
    trainer = make_trainer(**(trainer_kwargs or {}))
    trainer.fit(module, train_dataloaders=batches)
    metrics = {k: v.detach().clone() for k, v in trainer.callback_metrics.items()}
    return _flat(module) - before, metrics, module


def _assert_same_update(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = float(want.abs().max())
    assert scale > 1e-4, f"{what}: the reference update is ~0 ({scale}), the comparison would be vacuous"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, f"{what}: relative update error {rel:.2e}"


@pytest.fixture(scope="module")
def rollouts(tiny_model_dir: Path) -> dict:
    """Real rollouts of the tiny policy, generated once: 2 prompts x 4 and 4 prompts x 4 samples."""
    small = tiny_rollout(tiny_model_dir, num_prompts=2)
    large = tiny_rollout(tiny_model_dir, num_prompts=4)
    for batch in (small, large):
        lengths = batch.response_mask.sum(1)
        assert lengths.unique().numel() > 1, "rollouts of equal length would not test the normalisers"
        for g in batch.group_ids.unique():
            assert batch.rewards[batch.group_ids == g].std() > 0, "every group needs reward variance"
    return {"small": small, "large": large}


# ---- 1. micro-batch invariance ------------------------------------------------------------------
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_update_does_not_depend_on_micro_batch_size(tiny_model_dir: Path, rollouts: dict, objective: str) -> None:
    batch = rollouts["small"]  # N = 8
    fused, m_fused, _ = _train(tiny_model_dir, FixedBatches([batch]), objective, micro_batch_size=None)
    assert m_fused["objective/ratio_mean"].item() == 1.0
    for micro in (4, 2):  # two-pass path: a no-grad pass fixes the old logprobs, then 2 or 4 micro-batches
        split, m_split, _ = _train(tiny_model_dir, FixedBatches([batch]), objective, micro_batch_size=micro)
        _assert_same_update(split, fused, f"{objective} micro_batch_size={micro} vs None")
        for key in ("objective/loss", "objective/normalizer", "objective/grad_norm", "objective/ratio_mean"):
            torch.testing.assert_close(
                m_split[key], m_fused[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
            )


# ---- 2. DDP: two ranks with half the groups each == one process with all of them ------------------
@pytest.mark.parametrize(
    "objective, lora", [("GRPO", False), ("DAPO", False), ("GRPO", True)], ids=["GRPO", "DAPO", "GRPO-LoRA"]
)
def test_two_process_ddp_update_equals_single_process(
    tiny_model_dir: Path, rollouts: dict, objective: str, lora: bool
) -> None:
    batch = rollouts["large"]  # 4 groups of 4
    halves = [
        batch.select(torch.nonzero((batch.group_ids == 2 * r) | (batch.group_ids == 2 * r + 1)).squeeze(1))
        for r in range(2)
    ]
    tokens = [int(h.response_mask.sum()) for h in halves]
    assert tokens[0] != tokens[1], "ranks with equal token counts would not test DAPO's global token mean"
    # LoRA: adapters (B starts at 0, so this step moves B and the head only) and the trained head under DDP
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"], train_head=True) if lora else None
    policy = PolicySpec(str(tiny_model_dir), lora=spec)
    single, m_single, _ = _train(tiny_model_dir, FixedBatches([batch]), objective, policy=policy)
    ddp, m_ddp, _ = _train(
        tiny_model_dir, RankBatches(halves), objective, trainer_kwargs=dict(strategy="ddp_spawn", devices=2),
        policy=policy,
    )  # fmt: skip
    _assert_same_update(ddp, single, f"{objective}: 2-process DDP vs 1 process")
    # the normaliser is the global count in both runs
    assert m_ddp["objective/normalizer"].item() == pytest.approx(m_single["objective/normalizer"].item())


# ---- 3. ppo_epochs / minibatches > 1 really move the ratio and clip --------------------------------
@pytest.mark.parametrize("ppo_epochs,minibatches", [(2, 1), (1, 2)])
def test_multi_pass_step_moves_ratio_and_clips(
    tiny_model_dir: Path, rollouts: dict, ppo_epochs: int, minibatches: int
) -> None:
    _, metrics, _ = _train(
        tiny_model_dir,
        FixedBatches([rollouts["small"]]),
        "GRPO",
        lr=2.0,
        trainer_kwargs=dict(max_steps=ppo_epochs * minibatches),
        ppo_epochs=ppo_epochs,
        minibatches=minibatches,
    )
    assert abs(metrics["objective/ratio_mean"].item() - 1.0) > 1e-3
    clipped = metrics["objective/clip_frac_low"].item() + metrics["objective/clip_frac_high"].item()
    assert clipped > 0


def test_single_pass_step_has_ratio_one_and_no_clipping(tiny_model_dir: Path, rollouts: dict) -> None:
    _, metrics, _ = _train(tiny_model_dir, FixedBatches([rollouts["small"]]), "GRPO", lr=2.0)
    assert metrics["objective/ratio_mean"].item() == 1.0
    assert metrics["objective/clip_frac_low"].item() == 0.0
    assert metrics["objective/clip_frac_high"].item() == 0.0


# ---- 4. startup warnings for inert settings -------------------------------------------------------
CLIP_WARNING = "clip range"
TIS_WARNING = "tis_cap is set"


@pytest.mark.parametrize(
    "ppo_epochs,tis_cap,expected",
    [
        (1, None, {CLIP_WARNING}),
        (2, 2.0, {TIS_WARNING}),
        (1, 2.0, {CLIP_WARNING, TIS_WARNING}),
        (2, None, set()),
    ],
)
def test_startup_warns_about_inert_settings(
    tiny_model_dir: Path, rollouts: dict, ppo_epochs: int, tis_cap: float | None, expected: set
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(
            tiny_model_dir,
            FixedBatches([rollouts["small"]]),
            "GRPO",
            lr=0.1,
            trainer_kwargs=dict(max_steps=ppo_epochs),
            ppo_epochs=ppo_epochs,
            tis_cap=tis_cap,
        )
    messages = [str(w.message) for w in caught if str(w.message).startswith("capo:")]
    seen = {key for key in (CLIP_WARNING, TIS_WARNING) if any(key in m for m in messages)}
    assert seen == expected, messages


NAN_ON_ONE_RANK = """
import os, sys, torch
sys.path.insert(0, {root!r})
os.environ["HF_HUB_OFFLINE"] = "1"
import lightning as L
from capo_lightning.models.lora import LoraSpec
from capo_lightning.module import CAPOModule
from capo_lightning.models.policy import PolicySpec
from tests.helpers import RankOneNaNGRPO
from tests.helpers import SGD, RankBatches

if __name__ == "__main__":
    batch = torch.load({batches!r}, weights_only=False)
    module = CAPOModule(
        policy=PolicySpec({model!r}), objective=RankOneNaNGRPO(), optimizer=SGD(1.0), max_grad_norm=None
    )
    module.configure_model()
    before = torch.cat([p.detach().flatten().clone() for p in module.policy.parameters()])
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=RankBatches([batch, batch]))
    after = torch.cat([p.detach().flatten() for p in module.policy.parameters()])
    print("UNCHANGED", bool(torch.equal(before, after)))  # ddp_spawn copies rank-0 weights back
"""


def test_ddp_non_finite_loss_on_one_rank_skips_on_every_rank_without_hanging(
    tiny_model_dir: Path, rollouts: dict, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    path = tmp_path / "batches.pt"
    torch.save(rollouts["small"], path)
    script = tmp_path / "nan_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK.format(root=str(ROOT), batches=str(path), model=str(tiny_model_dir)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "UNCHANGED True" in done.stdout  # both ranks skipped: rank 0's finite update was not applied
    assert "`max_steps=2` reached" in out  # and the run went on to its end instead of hanging
    assert out.count("non-finite loss at rollout step") >= 2


# ---- 4. no forward that is not needed -------------------------------------------------------------
class _CountForwards:
    """Counts the policy's forward calls (a pre-hook on the transformers model itself)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.calls = 0
        policy.register_forward_pre_hook(self._count)

    def _count(self, *_args) -> None:
        self.calls += 1


@pytest.mark.parametrize(
    "selector,micro,expected",
    [
        (None, 2, 4),  # KeepAll-equivalent, 4 micro-batches of 2: exactly one forward each
        ("KeepAll", 2, 4),
        ("KeepAll", None, 1),
        ("CAPO", None, 1),  # one micro-batch: the training forward feeds the selector
        ("CAPO", 4, 2),  # 2 micro-batches: CAPO streams, each judged inside its own training forward
        ("CAPO-whole", 4, 4),  # a selector that needs the whole step: a no-grad look-ahead per micro-batch first
    ],
)
def test_a_single_update_step_runs_no_forward_it_does_not_need(
    tiny_model_dir: Path, rollouts: dict, selector: str | None, micro: int | None, expected: int
) -> None:
    from capo_lightning.selection import CAPOSelector, KeepAll

    class WholeStepCAPO(CAPOSelector):
        streams = False

    chosen = {"KeepAll": KeepAll(), "CAPO": CAPOSelector(top_k=8), "CAPO-whole": WholeStepCAPO(top_k=8), None: None}
    chosen = chosen[selector]
    module = _module(tiny_model_dir, selector=chosen, micro_batch_size=micro)
    module.configure_model()
    counter = _CountForwards(module.policy)
    make_trainer().fit(module, train_dataloaders=FixedBatches([rollouts["small"]]))  # N = 8 rows
    assert counter.calls == expected


class _Masks(L.Callback):
    """Keeps each step's token mask."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self.fisher: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        selection = step_result(outputs).selection
        self.masks.append(selection.token_mask & batch.response_mask)
        self.fisher.append(selection.shifts["token_fisher"][batch.response_mask])


@pytest.mark.parametrize("objective", ["DAPO", "GRPO"])
@pytest.mark.parametrize("streams", [True, False], ids=["streamed", "look_ahead"])
def test_capo_update_does_not_depend_on_micro_batch_size(
    tiny_model_dir: Path, rollouts: dict, objective: str, streams: bool
) -> None:
    """Judged micro-batch by micro-batch in the training forwards (DAPO's gradient rescaled to the final kept-token
    count), or after a look-ahead pass: the same mask, hence the same update, as one forward of the whole step."""
    from capo_lightning.selection import CAPOSelector

    class Selector(CAPOSelector):
        pass

    Selector.streams = streams

    def run(micro: int | None, **thresholds) -> tuple[torch.Tensor, _Masks]:
        masks = _Masks()
        update, _, _ = _train(
            tiny_model_dir, FixedBatches([rollouts["small"]]), objective, lr=0.1,
            trainer_kwargs=dict(callbacks=[masks]),
            selector=Selector(top_k=8, **thresholds), micro_batch_size=micro,
        )  # fmt: skip
        return update, masks

    _, probe = run(None, enforce=False)
    shifts = probe.fisher[0].double().unique()
    middle = shifts[shifts.numel() // 4 : 3 * shifts.numel() // 4]
    gap = int((middle[1:] / middle[:-1]).argmax())  # a threshold in the widest gap: no token sits near it
    delta_f = float((middle[gap] * middle[gap + 1]).sqrt())
    whole, mask_whole = run(None, delta_f=delta_f, tau_h=1e9)
    split, mask_split = run(2, delta_f=delta_f, tau_h=1e9)
    mask_whole, mask_split = mask_whole.masks[0], mask_split.masks[0]
    valid = int(rollouts["small"].response_mask.sum())
    assert 0 < int(mask_whole.sum()) < valid, "the mask must matter for the comparison to mean anything"
    assert torch.equal(mask_split, mask_whole)
    _assert_same_update(split, whole, f"CAPO ({objective}, streams={streams}) micro_batch_size=2 vs None")
