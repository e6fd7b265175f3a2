"""Tests for capo_lightning.rewards.math: extraction, equivalence and reward functions."""

from __future__ import annotations

import time

import pytest

from capo_lightning.rewards import (
    extract_answer,
    format_reward,
    is_equivalent,
    last_boxed,
    math_reward,
)

# (completion, gold, expected reward)
LABELLED_CASES = [
    # boxed integers
    ("\\boxed{42}", "42", 1.0),
    ("The sum is \\boxed{7}.", "7", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{42.0}", "42", 1.0),
    # nested braces, fractions, \dfrac
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\frac{3}{4}}", "\\frac{4}{3}", 0.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),  # plain numbers compare exactly
    # negatives and unicode minus
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{\u22127}", "-7", 1.0),
    ("The answer is \u22127.", "-7", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    # thousands separators and currency
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{1234}", "1,234", 1.0),
    ("\\boxed{1{,}234}", "1234", 1.0),
    ("\\boxed{\\$30}", "30", 1.0),
    ("\\boxed{30}", "$30$", 1.0),
    # answer phrases
    ("The answer is 42.", "42", 1.0),
    ("Answer: 17", "17", 1.0),
    ("**Answer:** $\\frac{2}{3}$", "2/3", 1.0),
    ("So the answer is 12 apples.", "12", 1.0),
    ("The answer is 13.", "12", 0.0),
    # last-number fallback
    ("So the total is 5 + 7 = 12", "12", 1.0),
    ("We get 3.5 at the end", "7/2", 1.0),
    ("the ratio is 1/2", "0.5", 1.0),
    ("Thus $x = 4$ and the area is 16.", "16", 1.0),
    ("Thus $x = 4$ and the area is 16.", "4", 0.0),
    # no answer, several boxes, malformed boxes
    ("I don't know.", "5", 0.0),
    ("", "5", 0.0),
    ("First \\boxed{3}, then corrected: \\boxed{4}", "4", 1.0),
    ("First \\boxed{3}, then corrected: \\boxed{4}", "3", 0.0),
    ("We know 2. \\boxed{\\frac{1}{2}", "2", 0.0),  # unclosed box: no fallback
    ("The value is 5. \\boxed{}", "5", 0.0),  # empty box: no fallback
    ("\\fbox{9}", "9", 1.0),
    ("so \\boxed 5 is it", "5", 1.0),
    # symbolic answers via math_verify
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{2^{10}}", "1000", 0.0),
    # gold given as a full solution with a box
    ("\\boxed{5}", "so x is \\boxed{5}", 1.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), LABELLED_CASES)
def test_math_reward_labelled_cases(completion: str, gold: str, expected: float) -> None:
    assert math_reward([completion], [gold]) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{a}", "a"),
        ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
        ("\\boxed{a} then \\boxed{b}", "b"),
        ("\\boxed{a} then \\fbox{c}", "c"),
        ("\\fbox{c} then \\boxed{a}", "a"),
        ("\\boxed{}", ""),
        ("\\boxed 5", "5"),
        ("$\\boxed 5$.", "5"),
        ("no box here", None),
        ("\\boxed{\\frac{1}{2}", None),
        ("\\boxed{a} \\boxed{b", None),  # the last box decides
        ("\\boxedx", None),
        ("\\boxed", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{ 12 }", "12"),
        ("The answer is 42.", "42"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("The answer is 3.5.", "3.5"),
        ("values 3 and -3", "-3"),
        ("so x = 5-3", "3"),
        ("it costs 1,234 dollars", "1,234"),
        ("half is 1/2", "1/2"),
        ("it is \u221212", "-12"),
        ("nothing numeric", None),
        ("\\boxed{}", None),
        ("7 \\boxed{", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("3", "3", True),
        ("$3$", "3", True),
        ("3.", "3", True),
        (" 1,000,000 ", "1000000", True),
        ("1,23", "123", False),  # not a thousands group
        ("\\frac{6}{8}", "3/4", True),
        ("1/0", "0", False),
        ("", "", False),
        ("\\frac{", "}{", False),
        ("\\", "$$", False),
        ("x" * 1000, "x" * 999, False),
    ],
)
def test_is_equivalent_never_raises(pred: str, gold: str, expected: bool) -> None:
    assert is_equivalent(pred, gold) is expected


@pytest.mark.parametrize(
    "tower",
    ["9^{9^{9^{9}}}", "9^{9^{9}}", "9^(9^9)", "9**9**9", "9^{99999999}", "10000000!"],
)
def test_exponent_towers_return_quickly(tower: str) -> None:
    start = time.perf_counter()
    rewards = math_reward([f"\\boxed{{{tower}}}"], ["5"])
    assert rewards == [0.0]
    assert time.perf_counter() - start < 2.0


def test_identical_tower_still_matches() -> None:
    # The string fast path runs before the tower guard.
    assert math_reward(["\\boxed{9^{9^{9}}}"], ["9^{9^{9}}"]) == [1.0]


def test_large_completion_is_fast() -> None:
    filler = "Let me think about this step by step, 12 + 30 = 42. " * 2_000  # ~100 kB
    completions = [filler + "\\boxed{42}", filler + "The answer is 41.", "\\boxed{42}" + filler]
    assert len(completions[0]) > 100_000
    start = time.perf_counter()
    rewards = math_reward(completions, ["42", "42", "7"])
    elapsed = time.perf_counter() - start
    # The third box lies outside the searched tail; the last number there is 42.
    assert rewards == [1.0, 0.0, 0.0]
    assert elapsed < 1.0


def test_only_the_tail_is_searched() -> None:
    assert extract_answer("\\boxed{42}" + " x" * 50_000) is None
    assert extract_answer("\\boxed{42}" + " x" * 1_000) == "42"


@pytest.mark.parametrize(
    "filler", ["1," * 50_000, "answer is " * 10_000, "\\boxed{" * 10_000, "{" * 100_000, "-" * 100_000]
)
def test_adversarial_large_completion_is_fast(filler: str) -> None:
    start = time.perf_counter()
    rewards = math_reward([filler], ["1"]) + format_reward([filler], ["1"])
    assert all(reward in (0.0, 1.0) for reward in rewards)
    assert time.perf_counter() - start < 1.0


def test_math_reward_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_reward(["\\boxed{1}", "\\boxed{2}"], ["1"])


def test_format_reward_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="1 completions but 0 answers"):
        format_reward(["\\boxed{1}"], [])


def test_math_reward_keeps_order_and_ignores_columns() -> None:
    rewards = math_reward(["\\boxed{1}", "\\boxed{3}", "\\boxed{3}"], ["1", "2", "3"], task=["a", "b", "c"])
    assert rewards == [1.0, 0.0, 1.0]


def test_math_reward_tolerates_non_string_inputs() -> None:
    assert math_reward([None, 5, "\\boxed{7}"], ["1", 5, 7]) == [0.0, 1.0, 1.0]  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("\\boxed{3}", 1.0),
        ("text \\boxed{\\frac{1}{2}} more text", 1.0),
        ("\\boxed 3", 1.0),
        ("The answer is 3.", 0.0),
        ("\\boxed{}", 0.0),
        ("\\boxed{3", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion: str, expected: float) -> None:
    assert format_reward([completion], ["anything"]) == [expected]
