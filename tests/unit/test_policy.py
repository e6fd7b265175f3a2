"""Tests for capo_lightning.models.policy: model resolution, loading, the tiny model and the bundled SmolLM2.

Run: pytest tests/unit/test_policy.py (fast, ~15 s with imports); pytest tests/unit/test_policy.py -m slow (~40 s).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from capo_lightning.models.policy import (
    BUNDLED_SMOLLM2,
    PolicySpec,
    _build_once,
    build_tiny_model,
    lm_head_weight,
    load_policy,
    load_tokenizer,
    resolve_model_dir,
)

QUESTION = [{"role": "user", "content": "What is 2+3? Answer with a number."}]


@pytest.fixture(scope="session")
def policy_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (seed 0) built once for this file."""
    return build_tiny_model(tmp_path_factory.mktemp("policy_tiny") / "model", seed=0)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_build_tiny_model_is_deterministic_per_seed(policy_tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    other = build_tiny_model(tmp_path / "other", seed=1)
    first, second, third = _weights(policy_tiny_dir), _weights(again), _weights(other)
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)  # the seed matters
    # The tokenizer does not depend on the seed.
    assert (policy_tiny_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_load_policy_tiny(policy_tiny_dir: Path) -> None:
    model, tok = load_policy(PolicySpec(name_or_path=str(policy_tiny_dir)))
    assert model.training and all(m.training for m in model.modules())
    assert model.config.use_cache is True
    assert tok.pad_token is not None and tok.pad_token != tok.eos_token
    assert model.generation_config.pad_token_id == tok.pad_token_id
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+3? Answer with a number.<|im_end|>\n<|im_start|>assistant\n"

    tok.padding_side = "left"
    batch = tok([prompt, "What is 1+1?"], return_tensors="pt", padding=True)
    logits = model(**batch).logits  # [B, T, V]
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert lm_head_weight(model).shape == (len(tok), model.config.hidden_size)  # [V, d]
    assert lm_head_weight(model) is model.get_input_embeddings().weight  # tied

    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)  # [B, T + <=4]
    assert batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 4


def test_tiny_tokenizer_survives_autotokenizer_reload(policy_tiny_dir: Path) -> None:
    """AutoTokenizer rebuilds a qwen2 tokenizer as Qwen2Tokenizer; it must encode exactly like tokenizer.json."""
    raw = Tokenizer.from_file(str(policy_tiny_dir / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(policy_tiny_dir)
    text = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Alice has 12 apples. Ünï \\boxed{19}"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text)["input_ids"]
    assert ids == raw.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("12")["input_ids"]) == ["1", "2"]  # one digit per token
    assert tok.convert_ids_to_tokens(tok("<|im_start|>")["input_ids"]) == ["<|im_start|>"]
    assert tok.eos_token == "<|im_end|>" and len(tok) == 512


def test_load_policy_options(policy_tiny_dir: Path) -> None:
    spec = PolicySpec(name_or_path=str(policy_tiny_dir), dtype="bfloat16", gradient_checkpointing=True)
    model, _ = load_policy(spec)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.config.use_cache is True
    ids = torch.tensor([[1, 5, 6, 7]])  # [B, T]
    model(input_ids=ids).logits.float().sum().backward()
    assert lm_head_weight(model).grad is not None


def test_relative_local_dir_resolves_to_itself(policy_tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(policy_tiny_dir.parent)
    resolved = resolve_model_dir(PolicySpec(name_or_path=f"./{policy_tiny_dir.name}"))
    assert Path(resolved) == policy_tiny_dir and Path(resolved).is_absolute()


def test_tiny_seed_is_built_once_into_cache(tmp_path: Path) -> None:
    spec = PolicySpec(name_or_path="tiny:3", cache_dir=str(tmp_path))
    first = Path(resolve_model_dir(spec))
    assert first.parent == tmp_path and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = Path(resolve_model_dir(spec))
    assert second == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left behind
    assert load_tokenizer(spec).chat_template is not None


def test_tiny_seeds_differ_and_plain_tiny_is_seed_0(tmp_path: Path, policy_tiny_dir: Path) -> None:
    plain = Path(resolve_model_dir(PolicySpec(name_or_path="tiny", cache_dir=str(tmp_path))))
    seeded = Path(resolve_model_dir(PolicySpec(name_or_path="tiny:3", cache_dir=str(tmp_path))))
    assert plain != seeded
    a, b = _weights(plain), _weights(policy_tiny_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_build_leaves_no_directory(tmp_path: Path) -> None:
    def failing_build(out: Path) -> None:
        (out / "half_written.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build_once(tmp_path / "model", failing_build)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["/nonexistent/model", "./does/not/exist", "~/no/such/capo/model", "a/b/c"])
def test_missing_path_names_the_option(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.policy.name_or_path") as info:
        load_policy(PolicySpec(name_or_path=name, cache_dir=str(tmp_path)))
    assert name in str(info.value) and "tiny" in str(info.value)


@pytest.mark.parametrize("name", ["tiny:x", "tiny:-1", "bundled:gpt2"])
def test_malformed_special_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.policy.name_or_path"):
        resolve_model_dir(PolicySpec(name_or_path=name, cache_dir=str(tmp_path)))


def test_offline_unknown_hub_id_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="model.policy.name_or_path") as info:
        load_policy(PolicySpec(name_or_path="capo-test-org/surely-not-cached-model", cache_dir=str(tmp_path)))
    assert time.perf_counter() - start < 10
    assert BUNDLED_SMOLLM2 in str(info.value) and "offline" in str(info.value).lower()


def test_bad_dtype_fails_before_building(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.policy.dtype"):
        load_policy(PolicySpec(name_or_path="tiny", dtype="fp32", cache_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled SmolLM2 converted into a fresh cache (~20-35 s)."""
    cache = tmp_path_factory.mktemp("capo_cache")
    return resolve_model_dir(PolicySpec(name_or_path=BUNDLED_SMOLLM2, cache_dir=str(cache)))


@pytest.mark.slow
def test_bundled_smollm2_converts_loads_and_answers(smollm2_dir: str) -> None:
    cache = Path(smollm2_dir).parent
    spec = PolicySpec(name_or_path=BUNDLED_SMOLLM2, cache_dir=str(cache))
    assert resolve_model_dir(spec) == smollm2_dir  # reused, not converted again
    assert [p.name for p in cache.iterdir()] == [Path(smollm2_dir).name]
    model, tok = load_policy(spec)
    assert type(model).__name__ == "LlamaForCausalLM" and model.training
    assert model.config.vocab_size == 49152 and lm_head_weight(model).shape == (49152, 576)
    assert not hasattr(model.config, "quantization_config")
    assert tok.chat_template and tok.pad_token is not None
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    batch = tok(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer
