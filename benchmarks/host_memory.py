r"""Peak host memory per rank while an FSDP2 run loads its model: every rank loading it, against rank 0 alone.

Run from the repository root, on CPU, offline (``bash scripts/install.sh test``)::

    .venv/bin/python benchmarks/host_memory.py                     # ~3 min on 2 cores
    .venv/bin/python benchmarks/host_memory.py --json runs/host_memory.json

What runs: ``capo fit --config conf/quickstart.yaml --config conf/trainer/fsdp.yaml`` on 2 CPU processes
(gloo, Lightning's own launcher, fp32 all-gathers) with the bundled SmolLM2-135M-Instruct in fp32 and a KL
term (``--model.objective.init_args.beta=0.04``, so a frozen reference is built too), once with
``FSDP2Strategy(rank0_loading=false)`` (every rank loads the whole model and deep-copies it) and once with
``rank0_loading=true`` (the default: meta skeleton everywhere, rank 0 reads the weights and hands out shards;
``capo_lightning/scale/loading.py``). The bundled model must already be converted (any earlier quickstart did
it; otherwise the first run converts it, ~35 s, and its rank 0 peak includes the conversion).

Method: the :class:`HostMemory` callback reads ``VmHWM`` (peak resident set) and ``VmRSS`` of its process
from ``/proc/self/status`` at ``setup`` (imports, process group, data module built: the baseline before
any weight is loaded) and at ``on_fit_start`` (the model loaded, sharded, and Lightning's setup done), writes
them, and ends the run there: nothing is trained. On a CPU machine a rank's shards live in host memory too;
on GPUs they go to the device and the host holds only the baseline (and, on rank 0, the loaded model while it
is handed out). Nothing is asserted: the script prints a table and ``RATIO`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
OUT = "CAPO_HOST_MEMORY_OUT"
MODEL_MB = 134.5e6 * 4 / 2**20  # SmolLM2-135M parameters in fp32


def _status() -> dict[str, float]:
    """VmHWM and VmRSS of this process in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024
    return values


class HostMemory(L.Callback):
    """Writes this rank's host memory before and after the model is loaded, then ends the run."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.before = _status()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        after = _status()
        record = {"rank": trainer.global_rank, "before": self.before, "after": after}
        path = Path(os.environ[OUT]) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
        trainer.strategy.barrier("host-memory")
        os._exit(0)  # nothing to train: both ranks leave together, after the barrier


def measure(rank0_loading: bool, workdir: Path) -> list[dict]:
    out = workdir / f"rank0_loading_{rank0_loading}"
    out.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "capo_lightning", "fit", "--config", str(ROOT / "conf/quickstart.yaml"),
        "--config", str(ROOT / "conf/trainer/fsdp.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.precision=32-true", "--trainer.strategy.init_args.process_group_backend=gloo",
        "--trainer.strategy.init_args.param_dtype=float32",
        f"--trainer.strategy.init_args.rank0_loading={str(rank0_loading).lower()}",
        "--model.objective.init_args.beta=0.04", "--trainer.callbacks+=benchmarks.host_memory.HostMemory",
        f"--trainer.default_root_dir={out / 'run'}", "--trainer.logger=false",
    ]  # fmt: skip
    env = dict(os.environ, **{OUT: str(out)}, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        sys.exit(f"capo fit failed (rank0_loading={rank0_loading}):\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rank0_loading in (False, True):
            results[f"rank0_loading={rank0_loading}"] = measure(rank0_loading, Path(tmp))
    print(f"model: SmolLM2-135M-Instruct fp32, {MODEL_MB:.0f} MiB of parameters; policy + KL reference; 2 ranks")
    print(f"{'loading':<22} {'rank':>4} {'baseline peak MiB':>18} {'peak MiB':>9} {'peak - baseline':>16}")
    for name, ranks in results.items():
        for r in ranks:
            base, peak = r["before"]["VmHWM"], r["after"]["VmHWM"]
            print(f"{name:<22} {r['rank']:>4} {base:>18.0f} {peak:>9.0f} {peak - base:>16.0f}")
    for rank in range(2):
        every, rank0 = (results[k][rank] for k in ("rank0_loading=False", "rank0_loading=True"))
        growth = [x["after"]["VmHWM"] - x["before"]["VmHWM"] for x in (every, rank0)]
        print(f"RATIO rank {rank} loading growth rank0/every = {growth[1] / growth[0]:.2f} "
              f"({growth[1]:.0f} / {growth[0]:.0f} MiB)")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
