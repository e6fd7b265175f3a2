"""Tests for capo_lightning.data.prompts."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import operator
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from capo_lightning.data.library_sources import HFDatasetSource, ReasoningGymSource
from capo_lightning.data.prompts import ArithmeticSource, JsonlSource, PromptItem
from capo_lightning.rewards.math import math_reward

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_QUESTION = re.compile(r"^What is (?P<expr>.+)\? (?P<instruction>.*)$")


def _evaluate(node: ast.AST) -> int:
    """Evaluates an integer +, -, * expression tree (the independent oracle)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        return _BINARY_OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise AssertionError(f"unexpected syntax in question: {ast.dump(node)}")


def _expression(item: PromptItem) -> str:
    match = _QUESTION.match(item.prompt)
    assert match, item.prompt
    return match.group("expr")


# ---------------------------------------------------------------- ArithmeticSource

ARITHMETIC_CONFIGS = [
    {},
    {"seed": 7, "min_value": -20, "max_value": 20, "num_terms": 4},
    {"seed": 3, "ops": ["*"], "min_value": 1, "max_value": 12, "num_terms": 3},
    {"seed": 5, "ops": ["-"], "min_value": 0, "max_value": 1000},
    {"min_value": 4, "max_value": 4, "ops": ["+", "*"], "num_terms": 6},
]


@pytest.mark.parametrize("config", ARITHMETIC_CONFIGS)
def test_arithmetic_answers_match_independent_evaluation(config: dict[str, Any]) -> None:
    source = ArithmeticSource(**config)
    for index in range(100):
        item = source.item(index)
        expression = _expression(item)
        assert item.answer == str(_evaluate(ast.parse(expression, mode="eval")))


@pytest.mark.parametrize("config", ARITHMETIC_CONFIGS)
def test_arithmetic_respects_ranges_ops_and_terms(config: dict[str, Any]) -> None:
    source = ArithmeticSource(**config)
    allowed_ops = set(config.get("ops", ["+", "-", "*"]))
    num_terms = config.get("num_terms", 2)
    for index in range(100):
        expression = _expression(source.item(index))
        tokens = re.sub(r"\((-\d+)\)", r"\1", expression).split(" ")
        operands, ops = tokens[0::2], tokens[1::2]
        assert len(operands) == num_terms
        assert set(ops) <= allowed_ops
        assert all(config.get("min_value", 0) <= int(value) <= config.get("max_value", 99) for value in operands)


def test_arithmetic_is_deterministic_across_instances() -> None:
    first, second = ArithmeticSource(seed=11), ArithmeticSource(seed=11)
    assert [first.item(i) for i in range(200)] == [second.item(i) for i in range(200)]
    assert first.item(123_456_789) == second.item(123_456_789)


def test_arithmetic_seeds_give_different_streams() -> None:
    seed0 = [ArithmeticSource(seed=0).item(i).prompt for i in range(100)]
    seed1 = [ArithmeticSource(seed=1).item(i).prompt for i in range(100)]
    # Unlike `Random(seed + i)`, a shifted stream must not reappear under the next seed.
    assert sum(a != b for a, b in zip(seed0, seed1)) > 90
    assert sum(a != b for a, b in zip(seed0[1:], seed1)) > 90


def test_arithmetic_prompt_format_and_metadata() -> None:
    source = ArithmeticSource(seed=2, instruction="Box it.")
    item = source.item(0)
    assert item.prompt.startswith("What is ")
    assert item.prompt.endswith("? Box it.")
    assert item.columns == {}
    assert source.size is None
    assert source.name() == "arithmetic"
    assert ArithmeticSource(instruction="").item(0).prompt.endswith("?")


def test_arithmetic_answers_are_graded_correct() -> None:
    items = [ArithmeticSource(seed=4, min_value=-50).item(i) for i in range(30)]
    completions = [f"\\boxed{{{item.answer}}}" for item in items]
    assert math_reward(completions, [item.answer for item in items]) == [1.0] * 30


def test_arithmetic_rejects_negative_index() -> None:
    with pytest.raises(IndexError, match="index -1"):
        ArithmeticSource().item(-1)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"min_value": 10, "max_value": 5}, "max_value"),
        ({"ops": []}, "ops"),
        ({"ops": ["+", "/"]}, "ops"),
        ({"num_terms": 1}, "num_terms"),
        ({"split": [0.5, 0.5]}, "split"),
        ({"split": [-0.1, 0.5]}, "split"),
        ({"split": [0.2, 1.5]}, "split"),
    ],
)
def test_arithmetic_validation_names_argument_and_fix(kwargs: dict[str, Any], arg: str) -> None:
    with pytest.raises(ValueError) as error:
        ArithmeticSource(**kwargs)
    message = str(error.value)
    assert f"data.train_source.init_args.{arg}" in message
    assert "Fix:" in message


def _canonical(expression: str) -> str:
    """The split key, rebuilt independently: a one-operator + or * chain with its operands sorted."""
    tokens = expression.split(" ")
    terms, ops = [int(t.strip("()")) for t in tokens[0::2]], tokens[1::2]
    if len(set(ops)) == 1 and ops[0] in "+*":
        terms = sorted(terms)
    return " ".join([str(terms[0]), *(f"{op} {term}" for op, term in zip(ops, terms[1:]))])


def _place(expression: str) -> float:
    return int(hashlib.sha256(_canonical(expression).encode()).hexdigest()[:16], 16) / 2**64


SPLIT_TASK = {"min_value": 10, "max_value": 99, "ops": ["+"]}


def test_arithmetic_without_split_is_the_unsplit_stream() -> None:
    """split=None keeps the stream every earlier run trained on: item i is the first draw of its own stream."""
    source = ArithmeticSource(seed=4, **SPLIT_TASK)
    for index in range(50):
        rng = random.Random(f"4:{index}")
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rng.choice(["+"])
        assert _expression(source.item(index)) == f"{a} + {b}"


@pytest.mark.parametrize(
    "config", [SPLIT_TASK, {"min_value": -9, "max_value": 9, "ops": ["+", "-", "*"], "num_terms": 3}]
)
def test_arithmetic_splits_are_disjoint_whatever_the_seeds(config: dict[str, Any]) -> None:
    """Three splits drawn with different seeds never share a problem (reordered sums included), each item's
    independently recomputed hash lies in its split, and each split's items are answered correctly."""
    splits = {"warm": [0.0, 0.5], "train": [0.5, 0.9], "heldout": [0.9, 1.0]}
    seen: dict[str, set[str]] = {}
    for seed, (name, split) in enumerate(splits.items()):
        source = ArithmeticSource(seed=seed, split=split, **config)
        seen[name] = set()
        for index in range(400):
            item = source.item(index)
            expression = _expression(item)
            assert split[0] <= _place(expression) < split[1]
            assert item.answer == str(_evaluate(ast.parse(expression, mode="eval")))
            seen[name].add(_canonical(expression))
    assert not seen["warm"] & seen["train"] and not seen["warm"] & seen["heldout"]
    assert not seen["train"] & seen["heldout"]


def test_arithmetic_split_sizes_follow_their_widths() -> None:
    """Over the whole two-operand space (4,095 distinct sums of 10..99), each split holds about its width."""
    places = [_place(f"{a} + {b}") for a in range(10, 100) for b in range(a, 100)]
    assert len(places) == 4095
    for lo, hi in ([0.0, 0.5], [0.5, 0.9], [0.9, 1.0]):
        share = sum(lo <= p < hi for p in places) / len(places)
        assert abs(share - (hi - lo)) < 0.03, (lo, hi, share)


def test_arithmetic_split_keeps_reordered_problems_together() -> None:
    """27 + 97 and 97 + 27 share a split; 27 - 97 and 97 - 27 are different problems."""
    assert _place("27 + 97") == _place("97 + 27")
    assert _place("27 - 97") != _place("97 - 27")
    low = ArithmeticSource(seed=0, split=[0.0, 0.5], **SPLIT_TASK)
    high = ArithmeticSource(seed=0, split=[0.5, 1.0], **SPLIT_TASK)
    pairs = {tuple(sorted(map(int, _expression(low.item(i)).split(" + ")))) for i in range(300)}
    pairs_high = {tuple(sorted(map(int, _expression(high.item(i)).split(" + ")))) for i in range(300)}
    assert not pairs & pairs_high


def test_arithmetic_split_that_holds_nothing_is_named() -> None:
    """A split no problem of a one-problem space falls in fails with a message naming the field."""
    only = _place("4 + 4")
    lo, hi = (0.5, 1.0) if only < 0.5 else (0.0, 0.5)
    with pytest.raises(ValueError, match="split"):
        ArithmeticSource(min_value=4, max_value=4, ops=["+"], split=[lo, hi]).item(0)


# ---------------------------------------------------------------- JsonlSource


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_happy_path_with_extra_columns(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "train.jsonl",
        [
            json.dumps({"prompt": "1+1?", "answer": "2", "level": 1, "tags": ["easy"]}),
            "",
            "   ",
            json.dumps({"prompt": "Half of 1?", "answer": 0.5}),
            json.dumps({"prompt": "Ten squared?", "answer": 100, "source": "mental"}),
        ],
    )
    source = JsonlSource(str(path))
    assert source.size == 3
    assert source.name() == "jsonl:train"
    assert source.item(0) == PromptItem("1+1?", "2", {"level": 1, "tags": ["easy"]})
    assert source.item(1) == PromptItem("Half of 1?", "0.5", {})
    assert source.item(2) == PromptItem("Ten squared?", "100", {"source": "mental"})
    with pytest.raises(IndexError):
        source.item(3)


def test_jsonl_custom_keys(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "Q?", "gold": "7", "id": 3})])
    item = JsonlSource(str(path), prompt_key="question", answer_key="gold").item(0)
    assert item == PromptItem("Q?", "7", {"id": 3})


JSONL_BAD_ROWS = [
    ("{not json", "prompt"),
    ("[1, 2]", "prompt"),
    ('"just a string"', "prompt"),
    (json.dumps({"answer": "1"}), "prompt"),
    (json.dumps({"prompt": "", "answer": "1"}), "prompt"),
    (json.dumps({"prompt": "   ", "answer": "1"}), "prompt"),
    (json.dumps({"prompt": 5, "answer": "1"}), "prompt"),
    (json.dumps({"prompt": "Q?"}), "answer"),
    (json.dumps({"prompt": "Q?", "answer": None}), "answer"),
    (json.dumps({"prompt": "Q?", "answer": ""}), "answer"),
    (json.dumps({"prompt": "Q?", "answer": True}), "answer"),
    (json.dumps({"prompt": "Q?", "answer": [1]}), "answer"),
]


@pytest.mark.parametrize(("bad_row", "key"), JSONL_BAD_ROWS)
def test_jsonl_bad_row_names_path_line_and_key(tmp_path: Path, bad_row: str, key: str) -> None:
    good = json.dumps({"prompt": "1+1?", "answer": "2"})
    path = _write_lines(tmp_path / "data.jsonl", [good, "", bad_row, good])  # blank line 2 counts
    with pytest.raises(ValueError) as error:
        JsonlSource(str(path))
    message = str(error.value)
    assert str(path) in message
    assert "line 3" in message
    assert repr(key) in message
    assert "Fix:" in message


def test_jsonl_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(ValueError, match="line 2"):
        JsonlSource(str(path))


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_jsonl_empty_file_names_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="no rows") as error:
        JsonlSource(str(path))
    assert str(path) in str(error.value)


def test_jsonl_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as error:
        JsonlSource(str(path))
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- ReasoningGymSource

RG_TASKS = ["basic_arithmetic", "gsm_symbolic", "fraction_simplification"]


@pytest.mark.parametrize("task", RG_TASKS)
def test_reasoning_gym_answers_are_graded_correct(task: str) -> None:
    source = ReasoningGymSource(task=task, size=25, seed=3)
    items = [source.item(i) for i in range(source.size)]
    answers = [item.answer for item in items]
    assert math_reward([f"\\boxed{{{answer}}}" for answer in answers], answers) == [1.0] * 25
    wrong = [f"\\boxed{{({answer.strip('$')}) + 1}}" for answer in answers]
    assert math_reward(wrong, answers) == [0.0] * 25


@pytest.mark.parametrize("task", RG_TASKS)
def test_reasoning_gym_items_are_deterministic_and_serialisable(task: str) -> None:
    first = ReasoningGymSource(task=task, size=10, seed=5, instruction="Box it.")
    second = ReasoningGymSource(task=task, size=10, seed=5, instruction="Box it.")
    for index in range(10):
        item = first.item(index)
        assert item == second.item(index)
        assert item.prompt.endswith(" Box it.")
        assert item.columns["task"] == task
        assert json.loads(json.dumps(item.columns)) == item.columns
    assert first.size == 10
    assert first.name() == f"rg:{task}"


def test_reasoning_gym_config_is_passed_through() -> None:
    source = ReasoningGymSource(task="basic_arithmetic", size=20, config={"min_terms": 2, "max_terms": 2})
    assert {source.item(i).columns["metadata"]["num_terms"] for i in range(20)} == {2}


def test_reasoning_gym_index_out_of_range() -> None:
    source = ReasoningGymSource(size=3)
    with pytest.raises(IndexError, match="0 <= index < 3"):
        source.item(3)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"task": "no_such_task"}, "no_such_task"),
        ({"config": {"bogus_field": 1}}, "bogus_field"),
        ({"size": 0}, "data.train_source.init_args.size"),
    ],
)
def test_reasoning_gym_bad_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ReasoningGymSource(**kwargs)


# ---------------------------------------------------------------- HFDatasetSource

HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def test_hf_source_without_datasets_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail as if absent
    with pytest.raises(ImportError, match="pip install datasets"):
        HFDatasetSource()


@pytest.mark.skipif(not HAS_DATASETS, reason="needs the datasets package")
def test_hf_source_loads_local_json_and_extracts_boxed(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "math.jsonl",
        [
            json.dumps({"problem": "P1", "solution": "so \\boxed{\\frac{1}{2}}.", "level": "L1"}),
            json.dumps({"problem": "P2", "solution": "\\boxed{1} no, \\boxed{2}", "level": "L2"}),
        ],
    )
    source = HFDatasetSource(path="json", split="train", data_files=str(path), instruction="")
    assert source.size == 2
    assert source.item(0) == PromptItem("P1", "\\frac{1}{2}", {"level": "L1"})
    assert source.item(1).answer == "2"
