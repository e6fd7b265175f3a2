"""W&B in offline mode through the real CLI: the run folder holds the metrics, histograms, completions table,
name and config. The offline run's record log is read back with a small reader written here (wandb 0.31
ships none in Python), so the check does not trust wandb's own summary."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from capo_lightning.commands.cli import main
from tests.conftest import ROOT

wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32 * 1024  # LevelDB-style log: 32 KiB blocks, 7-byte record headers (crc, length, type)
EXTRA = """
trainer:
  max_steps: 2
  callbacks:
    - capo_lightning.callbacks.RejectionMonitor
    - class_path: capo_lightning.callbacks.CurvatureMonitor
      init_args: {histogram_every_n_steps: 1}
    - class_path: capo_lightning.callbacks.CompletionsLog
      init_args: {every_n_steps: 1, rows: 3}
model:
  selector: {class_path: capo_lightning.selection.CAPOSelector}
data:
  reward_fn: tests.helpers.length_reward
"""


def read_records(path: Path) -> list:
    """The protobuf records of a ``run-*.wandb`` file."""
    data, records, pending, pos = path.read_bytes(), [], b"", 7  # 7-byte file header ":W&B" + magic + version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start, middle/last continue
        if kind in (1, 4):
            record = wandb_proto.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_offline_wandb_run_holds_metrics_histograms_table_and_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network attempt would fail
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline comes from the config, not the environment
    extra = tmp_path / "extra.yaml"
    extra.write_text(EXTRA)
    args = ["fit", "--config", str(ROOT / "conf/debug/tiny_cpu.yaml"), "--config", str(extra)]
    main([*args, "--config", str(ROOT / "conf/logger/wandb.yaml"), f"--trainer.default_root_dir={tmp_path}"])
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    records = read_records(log)
    history = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    keys = set().union(*history)
    for key in (
        "train/reward_mean",
        "select/token_reject_rate",
        "curvature/token_fisher_p95",
        "curvature/global_fisher",
    ):
        assert key in keys, key
    hist = next(h for h in history if "curvature/token_fisher_hist/_type" in h)  # histograms reach W&B
    assert json.loads(hist["curvature/token_fisher_hist/_type"]) == "histogram"
    assert sum(json.loads(hist["curvature/token_fisher_hist/values"])) > 0
    steps = sorted({json.loads(h["trainer/global_step"]) for h in history if "train/reward_mean" in h})
    assert steps == [1, 2], [(h.get("_step"), h.get("trainer/global_step"), len(h)) for h in history]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "GRPO-CAPO-lr0.001x8-s0" and run.run_group == "GRPO-CAPO-lr0.001x8"
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"model", "data", "trainer"} <= config_keys
    assert "CAPOSelector" in (run_dir / "files/capo_config.yaml").read_text()
    tables = sorted((run_dir / "files/media/table").glob("completions_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "prompt", "completion"] and len(table["data"]) == 3
    assert (tmp_path / "logs/version_0/metrics.csv").exists()  # the CSV logger runs alongside
