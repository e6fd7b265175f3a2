r"""The guard in front of sympy: strings on which ``math_verify`` may run for seconds to minutes.

:func:`~capo_lightning.rewards.grading.quick_verdict` grades such strings as not equivalent
instead of handing them to :func:`~capo_lightning.rewards.grading.symbolic_verdict`; the grading
pool's hard timeout catches whatever slips past.
"""

from __future__ import annotations

import re
from itertools import accumulate

__all__ = ["MAX_EXPONENTS", "MAX_NESTING", "MAX_VERIFY_CHARS", "is_pathological"]

MAX_VERIFY_CHARS = 300
"""Strings longer than this are never handed to sympy (graded as not equivalent)."""

MAX_EXPONENTS = 8
"""More exponent operators than this in one string is treated as pathological."""

MAX_NESTING = 8
"""Deeper bracket nesting is pathological: the LaTeX parser is exponential in it (20 bare braces:
minutes)."""

_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*[+-]?\d{5,}")
_BIG_EXPONENT_ON_GROUP = re.compile(r"[)\]}|]\s*\^\s*\{?\s*[+-]?\d{4,}")
_EXPONENT_CHAIN = re.compile(r"\^\s*(?:\{[^{}]*\}|\\?\w)\s*\^")
_SUM_BOUNDS = re.compile(
    r"\\(?:sum|prod)(?:\\limits)?\s*((?:[_^]\s*(?:\{[^{}]*\}|\\[A-Za-z]+|\w)\s*){1,2})"
)
_HEAVY_OPERAND = re.compile(r"[\^!*]|\\cdot|\\times")


def is_pathological(text: str) -> bool:
    r"""True when sympy could hang on ``text``; such strings are never verified.

    Refused, each seen to take seconds to minutes in ``math_verify``: strings over
    :data:`MAX_VERIFY_CHARS` characters; bracket nesting deeper than :data:`MAX_NESTING`; more than
    :data:`MAX_EXPONENTS` exponent operators; towers (``9^{9^{9}}``, ``a^b^c``, ``9**9**9``,
    ``((2^{99})^{99})^{99}``); exponents of five or more digits, or of four on a bracketed base
    (``(x+1)^{2024}`` against its expansion); factorials and binomials of large or compound
    arguments (``1000000!``, ``(10^{6})!``, ``99999!!``, ``\binom{10^{8}}{5\cdot10^{7}}``);
    ``\sum``/``\prod`` with a bound of three or more digits (``\sum_{k=1}^{300} k^{k}``).
    """
    if len(text) > MAX_VERIFY_CHARS:
        return True
    exponent_count = text.count("^") + text.count("**")
    return (
        max(accumulate((c in "{([") - (c in "})]") for c in text), default=0) > MAX_NESTING
        or exponent_count > MAX_EXPONENTS
        or ("**" in text and exponent_count > 1)
        or any(
            pattern.search(text)
            for pattern in (_BIG_EXPONENT, _BIG_EXPONENT_ON_GROUP, _EXPONENT_CHAIN)
        )
        or any(re.search(r"\d{3,}", bounds) for bounds in _SUM_BOUNDS.findall(text))
        or any(_is_heavy_operand(operand) for operand in _factorial_operands(text))
        or any(_is_tower(base, argument) for base, argument in _exponents(text))
    )


def _is_heavy_operand(operand: str) -> bool:
    """A factorial or binomial argument that may be astronomically large."""
    return (
        bool(_HEAVY_OPERAND.search(operand))
        or sum(map(int, re.findall(r"\d+", operand.replace(",", "")))) >= 100_000
    )


def _factorial_operands(text: str) -> list[str]:
    r"""The argument of each ``!`` (``"!"`` for the second of ``!!``) and both arguments of each
    ``\binom``."""
    operands = []
    for position, char in enumerate(text):
        if char != "!":
            continue
        before = text[:position].rstrip()
        if before and before[-1] in ")}]":
            operands.append(_group(before, backward=True))
        else:
            operands.append("!" if before.endswith("!") else re.search(r"[\w.,]*$", before).group())
    for match in re.finditer(r"\\binom", text):
        rest = text[match.end() :].lstrip()
        first = _group(rest) if rest.startswith("{") else rest[:1]
        second = text[match.end() :].lstrip()[len(first) :].lstrip()
        operands += [first, _group(second) if second.startswith("{") else second[:1]]
    return operands


def _exponents(text: str) -> list[tuple[str, str]]:
    """``(base, argument)`` of each ``^``: a bracket group or one char each (base "" if
    unbracketed)."""
    pairs = []
    for position, char in enumerate(text):
        if char != "^":
            continue
        before, rest = text[:position].rstrip(), text[position + 1 :].lstrip()
        base = _group(before, backward=True) if before and before[-1] in ")}]" else ""
        pairs.append((base, _group(rest) if rest and rest[0] in "{(" else rest[:1]))
    return pairs


def _is_tower(base: str, argument: str) -> bool:
    """``a^{b^c}``, ``a^{b**c}``, or ``(a^b)^{cd}`` with a power of a power whose outer exponent has
    2+ digits."""
    return (
        "^" in argument
        or "**" in argument
        or (("^" in base or "**" in base) and bool(re.search(r"\d{2,}", argument)))
    )


def _group(text: str, backward: bool = False) -> str:
    """The bracket group opening at ``text[0]`` (closing at ``text[-1]`` if ``backward``), or all of
    ``text``."""
    chars = text[::-1] if backward else text
    opener = chars[0]
    closer = {"(": ")", "{": "}", "[": "]", ")": "(", "}": "{", "]": "["}[opener]
    depth = 0
    for position, char in enumerate(chars):
        depth += (char == opener) - (char == closer)
        if depth == 0:
            return text[len(text) - position - 1 :] if backward else text[: position + 1]
    return text
