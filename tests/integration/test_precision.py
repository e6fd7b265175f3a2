"""Every CPU precision Lightning offers trains the tiny model, with and without CAPO, and the selector stays fp32.

``bf16-true`` converts the whole LightningModule to bf16 and sets bf16 as the default dtype inside the step;
``bf16-mixed`` keeps fp32 weights under autocast. Neither may cast the batch's logprobs and rewards, the
shadow Adam's moments, or the selector's arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from capo_lightning.models.forward import score_responses
from capo_lightning.models.policy import PolicySpec, lm_head_weight, load_policy
from capo_lightning.module import CAPOModule
from capo_lightning.objectives import GRPO
from capo_lightning.selection import CAPOSelector, TokenView
from capo_lightning.training.result import step_result
from tests.helpers import SGD, make_trainer, tiny_datamodule, tiny_rollout


class Dtypes(L.Callback):
    """What each step saw: the batch's float fields, the policy's weights, the selector's state, the metrics."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {n: p.detach().float().clone() for n, p in pl_module.policy.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        selector = pl_module.selector
        self.seen.append(
            dict(
                batch=(batch.behavior_logprobs.dtype, batch.rewards.dtype),
                weights=next(pl_module.policy.parameters()).dtype,
                adam=(selector.adam_m.dtype, selector.adam_v.dtype) if isinstance(selector, CAPOSelector) else None,
                adam_rows=int((selector.adam_m.abs().sum(1) > 0).sum()) if isinstance(selector, CAPOSelector) else 0,
                shifts=step_result(outputs).selection.shifts.get("token_fisher"),
                metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
            )
        )


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])  # 16-mixed: CUDA only (tests/gpu)
@pytest.mark.parametrize("capo", [False, True], ids=["grpo", "capo"])
def test_every_cpu_precision_trains_and_keeps_the_batch_and_selector_fp32(
    tiny_model_dir: Path, precision: str, capo: bool
) -> None:
    torch.manual_seed(0)
    selector = CAPOSelector(delta_f=1e9, tau_h=1e9) if capo else None  # keep every token: the state must move
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), objective=GRPO(), optimizer=SGD(0.1), selector=selector)
    probe = Dtypes()
    trainer = make_trainer(2, callbacks=[probe], precision=precision)
    trainer.fit(module, datamodule=tiny_datamodule())
    assert trainer.global_step == 2
    weights = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for step in probe.seen:
        assert step["batch"] == (torch.float32, torch.float32)
        assert step["weights"] == weights
        for key in ("train/reward_mean", "objective/loss", "objective/grad_norm", "train/completions_total"):
            assert math.isfinite(step["metrics"][key]), key
    assert probe.seen[-1]["metrics"]["train/completions_total"] == 16.0  # 2 steps x 8, not rounded to bf16
    if capo:
        assert all(step["adam"] == (torch.float32, torch.float32) for step in probe.seen)
        assert probe.seen[-1]["adam_rows"] > 0
        assert probe.seen[-1]["shifts"].dtype == torch.float32
    moved = [n for n, p in module.policy.named_parameters() if not torch.equal(p.detach().float(), probe.start[n])]
    assert moved, "no parameter changed"


def test_selector_on_bf16_inputs_decides_exactly_as_on_the_same_values_in_fp32(tiny_model_dir: Path) -> None:
    # identical inputs: the bf16 tensors, and the same values held in fp32
    batch = tiny_rollout(tiny_model_dir, num_prompts=4)
    policy, _ = load_policy(PolicySpec(str(tiny_model_dir)))
    policy = policy.to(torch.bfloat16)
    with torch.no_grad():
        out = score_responses(
            policy, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1], need_hidden=True
        )
    assert out.hidden.dtype == torch.bfloat16
    adv = GRPO().advantages(batch.rewards, batch.group_ids).unsqueeze(1).expand_as(batch.response_mask)
    head = lm_head_weight(policy).detach()

    def view(dtype: torch.dtype) -> TokenView:
        return TokenView(
            actions=batch.responses, response_mask=batch.response_mask, advantages=adv.clone(),
            old_logprobs=out.logprobs.float(), hidden=out.hidden.to(dtype), lm_head=head.to(dtype), lr=1e-2,
        )  # fmt: skip

    probe = CAPOSelector(enforce=False)(view(torch.float32)).shifts["token_fisher"][batch.response_mask]
    delta_f = float(probe.median())  # rejects about half the tokens: the masks are informative
    low, full = CAPOSelector(delta_f=delta_f, tau_h=1e9), CAPOSelector(delta_f=delta_f, tau_h=1e9)
    low.to(torch.bfloat16)  # what bf16-true does to the module tree: the state must not follow
    rejected = []
    for _ in range(2):  # the second step uses the shadow Adam's moments
        got_low, got_full = low(view(torch.bfloat16)), full(view(torch.float32))
        assert torch.equal(got_low.token_mask, got_full.token_mask)
        rejected.append(int((~got_full.token_mask & batch.response_mask).sum()))
        assert torch.equal(got_low.shifts["token_fisher"], got_full.shifts["token_fisher"])
        assert low.adam_m.dtype == low.adam_v.dtype == torch.float32
        assert torch.equal(low.adam_m, full.adam_m) and torch.equal(low.adam_v, full.adam_v)
    # the first step's threshold is its median shift: some tokens kept, some rejected (the second step's moments
    # may move every shift past it)
    assert 0 < rejected[0] < int(batch.response_mask.sum()), rejected
    assert int(low.adam_step) == 2


def test_fp16_weights_are_refused_with_the_alternatives(tiny_model_dir: Path) -> None:
    module = CAPOModule(policy=PolicySpec(str(tiny_model_dir)), optimizer=SGD(0.1))
    with pytest.raises(ValueError, match="trainer.precision=16-true .* use 16-mixed"):
        make_trainer(1, precision="16-true").fit(module, datamodule=tiny_datamodule())
