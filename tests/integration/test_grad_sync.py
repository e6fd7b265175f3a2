"""One gradient reduction per optimizer step, counted on the collectives themselves (2 gloo processes).

A step accumulates its gradient over micro-batches; only the last backward before the optimizer step may reduce
it over ranks. Under DDP every schedule's micro-batch backwards run under ``no_sync`` but the last, so each
optimizer step makes exactly the all-reduces (one per bucket) that a step of one micro-batch makes; under FSDP2
with ``FSDP2Strategy(accumulate_unsharded=True)`` each sharded unit reduce-scatters once per step (without it, once
per micro-batch: the default keeps sharded gradients and pays a reduce-scatter per backward). Counted by a DDP
communication hook that counts, then all-reduces as DDP does by default, and by wrapping
``torch.distributed.reduce_scatter_single``, which FSDP2 calls once per unit and reducing backward. The update is
each time that of one process on the whole batch (plain SGD: the update is -lr * gradient, so a gradient reduced
too often or too rarely would show).

Each 2-process run is a script in its own process group (``python script.py``, Lightning launching the second
rank), as ``capo fit`` would be; the script calls :func:`fit_runs` here, so both ranks run this file's code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from capo_lightning.models.policy import PolicySpec, load_policy
from capo_lightning.module import CAPOModule
from capo_lightning.scale.parallel import FSDP2Strategy, full_tensor
from capo_lightning.selection import CAPOSelector
from tests.conftest import ROOT
from tests.helpers import SGD, FixedBatches, RankBatches, make_trainer, tiny_rollout

# each rank trains on 8 rows: micro-batches of 2 make 4 backwards per optimizer step, of 3 make 3
DDP_RUNS: dict[str, dict[str, Any]] = {
    "whole": {},  # one micro-batch: the one backward is the optimizer step's (MASK_FIRST, one chunk)
    "mask_first": dict(micro_batch_size=2),
    "look_ahead": dict(micro_batch_size=3, selector="whole_step"),
    "streaming": dict(micro_batch_size=3, selector="capo"),  # gradients rescaled after the (one) reduction
    "multi_pass": dict(micro_batch_size=2, minibatches=2),  # 2 optimizer steps of 2 micro-batches each
}
FSDP2_RUNS: dict[str, dict[str, Any]] = {
    "whole": {},
    "each_micro_batch": dict(micro_batch_size=2),  # the default: sharded gradients, a reduce-scatter per backward
    "accumulated": dict(micro_batch_size=2, accumulate_unsharded=True),
    "streaming_accumulated": dict(micro_batch_size=3, selector="capo", accumulate_unsharded=True),
}


class WholeStepCAPO(CAPOSelector):
    """CAPO judging the whole step at once: the LOOK_AHEAD schedule."""

    streams = False


def _selector(name: str | None) -> CAPOSelector | None:
    """Selectors that keep every token (the schedule is what is tested, not the mask)."""
    kinds = {"capo": CAPOSelector, "whole_step": WholeStepCAPO}
    return kinds[name](delta_f=1e9, tau_h=1e9) if name else None


def _module(model_dir: str, run: dict[str, Any]) -> CAPOModule:
    torch.manual_seed(0)
    return CAPOModule(
        policy=PolicySpec(model_dir),
        selector=_selector(run.get("selector")),
        optimizer=SGD(1.0),
        max_grad_norm=None,
        micro_batch_size=run.get("micro_batch_size"),
        minibatches=run.get("minibatches", 1),
    )


def _counted_allreduce(state, bucket):  # unannotated: DDP refuses a hook whose annotations are strings
    """DDP's default all-reduce of one bucket (mean over ranks), counted."""
    state.calls += 1
    return allreduce_hook(None, bucket)


class Reductions(L.Callback):
    """The gradient reductions of each optimizer step on this rank: DDP bucket all-reduces and FSDP2
    reduce-scatters (``per_step``, one count per optimizer step)."""

    def __init__(self) -> None:
        self.calls = 0
        self.per_step: list[int] = []
        self._reduce_scatter = dist.reduce_scatter_single

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(self, _counted_allreduce)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._reduce_scatter(*args, **kwargs)

        dist.reduce_scatter_single = counted  # FSDP2 looks it up on the module at every call

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.per_step.append(self.calls)
        self.calls = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dist.reduce_scatter_single = self._reduce_scatter


def fit_runs(kind: str, model_dir: str, halves_path: str, out: str) -> None:
    """Every run of ``kind`` ("ddp" or "fsdp2") on this rank's half of the batch; rank 0 saves each run's
    reductions per optimizer step and its final (whole) parameters to ``out``."""
    halves = torch.load(halves_path, weights_only=False)
    results = {}
    for name, run in (DDP_RUNS if kind == "ddp" else FSDP2_RUNS).items():
        module = _module(model_dir, run)
        accumulate = run.get("accumulate_unsharded", False)
        strategy = "ddp" if kind == "ddp" else FSDP2Strategy(param_dtype="float32", accumulate_unsharded=accumulate)
        reductions = Reductions()
        trainer = make_trainer(
            max_steps=run.get("minibatches", 1), devices=2, strategy=strategy, callbacks=[reductions]
        )
        trainer.fit(module, train_dataloaders=RankBatches(halves))
        params = {n: full_tensor(p.detach()).clone() for n, p in module.policy.named_parameters()}
        results[name] = dict(per_step=reductions.per_step, params=params)
    if trainer.global_rank == 0:
        torch.save(results, out)


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.integration.test_grad_sync import fit_runs

if __name__ == "__main__":
    fit_runs({kind!r}, {model!r}, {halves!r}, {out!r})
"""


@pytest.fixture(scope="module")
def halves(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A real rollout of 4 groups x 4 cut into two halves (two groups per rank), saved for the scripts, and the
    whole batch for one process, its rows ordered so that each of 2 minibatches is the union of the ranks' own
    (rank 0's first 4 rows, rank 1's first 4, then the second 4 of each)."""
    batch = tiny_rollout(tiny_model_dir, num_prompts=4)
    rows = [torch.nonzero(batch.group_ids // 2 == r).squeeze(1) for r in range(2)]
    path = tmp_path_factory.mktemp("grad_sync") / "halves.pt"
    torch.save([batch.select(r) for r in rows], path)
    return batch.select(torch.cat([rows[0][:4], rows[1][:4], rows[0][4:], rows[1][4:]])), path


def _two_processes(kind: str, model_dir: Path, halves_path: Path) -> dict[str, dict[str, Any]]:
    out = halves_path.parent / f"{kind}.pt"
    script = halves_path.parent / f"{kind}.py"
    script.write_text(
        SCRIPT.format(root=str(ROOT), kind=kind, model=str(model_dir), halves=str(halves_path), out=str(out))
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def _one_process(model_dir: Path, batch: Any, run: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The parameters after the same run in one process on the whole batch (no micro-batches)."""
    whole = {k: v for k, v in run.items() if k in ("selector", "minibatches")}
    module = _module(str(model_dir), whole)
    make_trainer(max_steps=whole.get("minibatches", 1)).fit(module, train_dataloaders=FixedBatches([batch]))
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def _assert_same_update(got: dict, want: dict, start: dict, what: str) -> None:
    """The update (after - start) of ``got`` equals ``want``'s to a relative 1e-5."""
    got_update = torch.cat([(got[n] - start[n]).flatten() for n in want])
    want_update = torch.cat([(want[n] - start[n]).flatten() for n in want])
    assert want_update.abs().max() > 1e-4, f"{what}: the reference update is ~0, the comparison would be vacuous"
    rel = float((got_update - want_update).norm() / want_update.norm())
    assert rel < 1e-5, f"{what}: relative update error {rel:.2e}"


def _check_updates(model_dir: Path, batch: Any, runs: dict, results: dict, what: str) -> None:
    start = {n: p.detach().clone() for n, p in load_policy(PolicySpec(str(model_dir)))[0].named_parameters()}
    references: dict[tuple, dict] = {}
    for name, run in runs.items():
        key = (run.get("selector"), run.get("minibatches", 1))
        if key not in references:
            references[key] = _one_process(model_dir, batch, run)
        _assert_same_update(results[name]["params"], references[key], start, f"{what} {name} vs one process")


def test_ddp_reduces_the_gradient_once_per_optimizer_step_in_every_schedule(
    tiny_model_dir: Path, halves: tuple[Any, Path]
) -> None:
    batch, path = halves
    results = _two_processes("ddp", tiny_model_dir, path)
    per_step = results["whole"]["per_step"]  # one all-reduce per bucket
    assert len(per_step) == 1 and per_step[0] >= 1, per_step
    for name, run in DDP_RUNS.items():
        steps = run.get("minibatches", 1)
        assert results[name]["per_step"] == per_step * steps, (name, results[name]["per_step"], per_step)
    _check_updates(tiny_model_dir, batch, DDP_RUNS, results, "DDP")


def test_fsdp2_accumulating_unsharded_reduce_scatters_once_per_optimizer_step(
    tiny_model_dir: Path, halves: tuple[Any, Path]
) -> None:
    batch, path = halves
    results = _two_processes("fsdp2", tiny_model_dir, path)
    (once,) = results["whole"]["per_step"]  # one reduce-scatter per sharded unit: 2 decoder layers + the root
    assert once == 3, results["whole"]["per_step"]
    assert results["each_micro_batch"]["per_step"] == [4 * once]  # the default: one per micro-batch backward
    assert results["accumulated"]["per_step"] == [once]
    assert results["streaming_accumulated"]["per_step"] == [once]
    _check_updates(tiny_model_dir, batch, FSDP2_RUNS, results, "FSDP2")
