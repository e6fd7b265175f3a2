"""Collectives that agree by construction: ranks made to disagree on purpose (2 gloo processes, the HF engine).

A reward defined here gives every completion on rank 0 the same reward (no group varies: that rank wants every
sampling round) and every completion on rank 1 its own (every group varies: one round is enough). With the HF
engine under FSDP2, ``generate`` runs on the sharded policy, so each decoding step all-gathers parameters: a rank
that decided alone to sample once more would be generating while the other trains, and the collectives would pair
wrongly or hang. The rule (``keep_varied_groups``): every rank runs the rounds the neediest rank needs (agreed after
each round by one all-reduce) and keeps its first varied groups, topped up in order with zero-variance ones. Checked
on what each rank trained on, under FSDP2 and under DDP (the control: no collective during generation there).
Likewise ranks whose completions end at different decoding steps: under FSDP2 each keeps stepping until all have
ended (transformers' ``synced_gpus``), and the steps after a rank's own end are not read as behaviour logprobs.

A short process-group timeout makes a hang fail in about a minute instead of the default 30; each 2-process run is
a script in its own process group calling :func:`fit_disagreeing` (both ranks run this file's code).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch.distributed as dist

from tests.conftest import ROOT

GROUP_SIZE, PROMPTS, ROUNDS, STEPS = 4, 2, 3, 2
TIMEOUT_S = 60  # the process group's: a hung collective raises after this
RUN_TIMEOUT_S = 300  # the whole 2-process run


def rank_split_reward(completions: list[str], answers: list[str], **columns: Any) -> list[float]:
    """Rank 0: 1.0 for every completion (no group varies); any other rank: the completion's index (every group
    varies)."""
    if dist.is_initialized() and dist.get_rank() == 0:
        return [1.0] * len(completions)
    return [float(i) for i in range(len(completions))]


class TrainedOn(L.Callback):
    """What this rank trained on at each step: its prompts (one per group), rewards, response lengths, sampling
    stats and its own gap between the engine's and the trainer's logprobs."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.records.append(
            dict(
                step=batch.rollout_step,
                prompts=list(batch.texts.prompts[::GROUP_SIZE]),
                rewards=batch.rewards.tolist(),
                lengths=batch.response_mask.sum(1).tolist(),
                stats={k: float(v) for k, v in batch.stats.items() if k.startswith("rollout/")},
            )
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, idx) -> None:
        from capo_lightning import keys
        from capo_lightning.training.result import step_result

        self.records[-1]["engine_gap"] = float(step_result(outputs).metrics[keys.ENGINE_GAP])


class EndsAtOnce(L.Callback):
    """Rank 0's policy ends every completion at its first token (every token is an end of sequence there), so
    its ``generate`` is done after one decoding step while the other rank's goes on."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            pl_module.policy.generation_config.eos_token_id = list(range(pl_module.policy.config.vocab_size))


def fit_disagreeing(kind: str, case: str, model_dir: str, out: str) -> None:
    """``STEPS`` steps under ``kind`` ("fsdp2" or "ddp") with the HF engine, the ranks disagreeing on ``case``:
    "rounds", DAPO dynamic sampling (``ROUNDS`` rounds at most) with :func:`rank_split_reward`; "lengths", where
    each rank's completions end (:class:`EndsAtOnce`). Each rank writes what it trained on and, per step, its
    first-round and refill prompts to ``<out>/rank<r>.json``."""
    from lightning.pytorch.strategies import DDPStrategy

    from capo_lightning.models.policy import PolicySpec
    from capo_lightning.module import CAPOModule
    from capo_lightning.rollout import SamplingConfig
    from capo_lightning.scale.parallel import FSDP2Strategy
    from tests.helpers import SGD, make_trainer, tiny_datamodule

    timeout = timedelta(seconds=TIMEOUT_S)
    strategy = (
        FSDP2Strategy(param_dtype="float32", timeout=timeout) if kind == "fsdp2" else DDPStrategy(timeout=timeout)
    )
    module = CAPOModule(policy=PolicySpec(model_dir), optimizer=SGD(0.1))
    rounds = dict(reward_fn=rank_split_reward, dynamic_sampling=True, max_sampling_rounds=ROUNDS)
    dm = tiny_datamodule(
        prompts_per_step=PROMPTS, group_size=GROUP_SIZE, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
        **(rounds if case == "rounds" else {}),
    )  # fmt: skip
    trained = TrainedOn()
    callbacks = [trained] if case == "rounds" else [trained, EndsAtOnce()]
    trainer = make_trainer(max_steps=STEPS, devices=2, strategy=strategy, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    rounds = {
        step: [[dm.format_prompt(dm._train_item(step, j).prompt) for j in range(PROMPTS)]]
        + [[dm.format_prompt(dm._refill_item(step, r, j).prompt) for j in range(PROMPTS)] for r in range(1, ROUNDS)]
        for step in range(STEPS)
    }
    record = dict(trained=trained.records, rounds=rounds, global_step=trainer.global_step)
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.integration.test_collective_agreement import fit_disagreeing

if __name__ == "__main__":
    fit_disagreeing({kind!r}, {case!r}, {model!r}, {out!r})
"""


def _two_processes(kind: str, case: str, model_dir: Path, folder: Path) -> list[dict[str, Any]]:
    script = folder / f"{kind}_{case}.py"
    script.write_text(SCRIPT.format(root=str(ROOT), kind=kind, case=case, model=str(model_dir), out=str(folder)))
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"{kind}: the 2-process run did not finish in {RUN_TIMEOUT_S} s: {str(hung.stderr)[-3000:]}")
    assert proc.returncode == 0, f"{kind}: {proc.stderr[-4000:]}"
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_ranks_that_disagree_run_the_rounds_of_the_neediest_rank(
    tiny_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    ranks = _two_processes(kind, "rounds", tiny_model_dir, tmp_path)
    for rank, seen in enumerate(ranks):
        assert seen["global_step"] == STEPS and [r["step"] for r in seen["trained"]] == list(range(STEPS))
        for record in seen["trained"]:
            stats, rounds = record["stats"], seen["rounds"][str(record["step"])]
            # both ranks ran every round: rank 0 needed them all, so rank 1 ran them too
            assert stats["rollout/sampling_rounds"] == ROUNDS, (kind, rank, stats)
            assert stats["rollout/groups_generated"] == ROUNDS * PROMPTS, (kind, rank, stats)
            # each rank trained on its own first-round prompts: rank 1 kept its first varied groups (the rounds
            # after they were found are discarded), rank 0 found none and was topped up with its first groups
            assert record["prompts"] == rounds[0], (kind, rank)
            groups = [record["rewards"][g * GROUP_SIZE : (g + 1) * GROUP_SIZE] for g in range(PROMPTS)]
            varied = [max(g) > min(g) for g in groups]
            if rank == 0:
                assert stats["rollout/groups_filled"] == PROMPTS and stats["rollout/groups_kept_frac"] == 0.0
                assert not any(varied)
            else:
                assert stats["rollout/groups_filled"] == 0.0 and stats["rollout/groups_kept_frac"] == 1.0
                assert all(varied)
    # step 1 trained on the position's next batch however many rounds step 0 ran (the refill prompts are each
    # rank's own, reserved per step): the data position stays one count of batches
    assert ranks[0]["rounds"] != ranks[1]["rounds"]


def test_ranks_whose_completions_end_at_different_steps_decode_in_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Under FSDP2 every decoding step of ``generate`` all-gathers parameters: a rank whose completions have all
    ended keeps stepping (without sampling) until every rank's have (transformers' ``synced_gpus``)."""
    ranks = _two_processes("fsdp2", "lengths", tiny_model_dir, tmp_path)
    for rank, seen in enumerate(ranks):
        assert seen["global_step"] == STEPS and len(seen["trained"]) == STEPS
        for record in seen["trained"]:
            if rank == 0:
                assert set(record["lengths"]) == {1}, record["lengths"]  # each ended at its first token
            else:
                assert max(record["lengths"]) > 1, record["lengths"]
            # the behaviour logprobs belong to the tokens sampled, not to the steps stepped after the end
            assert record["engine_gap"] < 1e-4, (rank, record["engine_gap"])
