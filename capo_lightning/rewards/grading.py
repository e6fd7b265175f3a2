"""Answer equivalence: exact fast paths in-process, symbolic comparison with math-verify.

:func:`quick_verdict` decides what needs no sympy (identical strings, plain numbers
compared as exact fractions, inputs refused by the :func:`_is_pathological` guard).
:func:`symbolic_verdict` runs ``math_verify`` and can take unbounded time on adversarial
input, so :mod:`capo_lightning.rewards.verifier` runs it in a worker process under a
hard wall-clock timeout. :func:`is_equivalent` chains both in the calling process,
without a timeout.
"""

from __future__ import annotations

import re
from fractions import Fraction

from capo_lightning.rewards.extract import strip_math_delimiters

__all__ = ["is_equivalent", "normalize", "quick_verdict", "symbolic_verdict"]

MAX_VERIFY_CHARS = 300
"""Strings longer than this are never handed to sympy (graded as not equivalent)."""

MAX_EXPONENTS = 2
"""More exponent operators than this in one string is treated as pathological."""

_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_SIGN_SPACE = re.compile(r"^([+-])\s+")
_PLAIN_FRACTION = re.compile(r"^(?P<sign>[+-]?)(?P<num>\d+)/(?P<den>\d+)$")
_LATEX_FRACTION = re.compile(r"^(?P<sign>[+-]?)\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}$")
_BIG_FACTORIAL = re.compile(r"\d{5,}\s*!")
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*\d{6,}")


def normalize(text: str) -> str:
    """Canonical surface form used for string equality and the number fast path."""
    text = strip_math_delimiters(str(text).replace("\u2212", "-"))
    for thin_space in ("\\,", "\\!", "\\ "):
        text = text.replace(thin_space, "")
    return text.replace("{,}", ",").replace("\\$", "").strip()


def _as_number(text: str) -> Fraction | None:
    r"""Parses a plain number (``-1,234.5``, ``.5``, ``1/2``, ``\frac{1}{2}``) exactly.

    Returns None for anything else, including malformed thousands groups such as
    ``1,23`` (those could be tuples) and zero denominators.
    """
    compact = _SIGN_SPACE.sub(r"\1", text)
    if _PLAIN_NUMBER.match(compact):
        return Fraction(compact.replace(",", ""))
    fraction = _PLAIN_FRACTION.match(compact) or _LATEX_FRACTION.match(compact)
    if fraction is None or int(fraction.group("den")) == 0:
        return None
    value = Fraction(int(fraction.group("num")), int(fraction.group("den")))
    return -value if fraction.group("sign") == "-" else value


def _is_pathological(text: str) -> bool:
    """True when sympy could hang on ``text``; such strings are never verified.

    Refused: strings over :data:`MAX_VERIFY_CHARS` characters, more than
    :data:`MAX_EXPONENTS` exponent operators, any exponent whose argument itself
    contains an exponent (``9^{9^{9}}`` has only two ``^`` yet takes minutes in
    ``verify``), Python-style ``**`` chains (right-associative, so ``9**9**9``
    hangs too), exponents with six or more digits and factorials of five-digit
    numbers (``1000000!`` takes seconds).
    """
    if len(text) > MAX_VERIFY_CHARS:
        return True
    exponent_count = text.count("^") + text.count("**")
    if exponent_count > MAX_EXPONENTS or ("**" in text and exponent_count > 1):
        return True
    if _BIG_FACTORIAL.search(text) or _BIG_EXPONENT.search(text):
        return True
    return any("^" in argument or "**" in argument for argument in _exponent_arguments(text))


def _exponent_arguments(text: str) -> list[str]:
    """Returns the argument of each ``^``: a ``{...}`` or ``(...)`` group, else one char."""
    arguments = []
    for position, char in enumerate(text):
        if char != "^":
            continue
        rest = text[position + 1 :].lstrip()
        arguments.append(_leading_group(rest) if rest[:1] in "{(" else rest[:1])
    return arguments


def _leading_group(text: str) -> str:
    """Returns the bracket group that opens at ``text[0]`` (to the end if unclosed)."""
    opener = text[0]
    closer = "}" if opener == "{" else ")"
    depth = 0
    for position, char in enumerate(text):
        depth += (char == opener) - (char == closer)
        if depth == 0:
            return text[: position + 1]
    return text


def quick_verdict(pred: str, gold: str) -> bool | None:
    r"""Decides equivalence without sympy where that is exact; None means "ask :func:`symbolic_verdict`".

    True for identical normalised strings; for two plain numbers (``$``, thousands commas,
    trailing ``.0``, unicode minus, ``a/b`` and ``\frac{a}{b}`` allowed) the exact fraction
    comparison, so ``0.333`` is *not* ``1/3``; False for empty sides and for inputs the
    :func:`_is_pathological` guard refuses. Never raises.
    """
    try:
        pred, gold = normalize(pred), normalize(gold)
        if not pred or not gold:
            return False
        if pred == gold:
            return True
        pred_number, gold_number = _as_number(pred), _as_number(gold)
        if pred_number is not None and gold_number is not None:
            return pred_number == gold_number
        if _is_pathological(pred) or _is_pathological(gold):
            return False
        return None
    except Exception:  # noqa: BLE001 - a grader must never crash the training loop
        return False


SYMBOLIC_STATUSES = ("ok", "pred_unparsed", "gold_unparsed")
"""What :func:`symbolic_verdict` reports besides the verdict."""


def symbolic_verdict(pred: str, gold: str) -> tuple[bool, str]:
    """Compares with ``math_verify`` (sympy); may run for minutes on adversarial input.

    Run it under :class:`~capo_lightning.rewards.verifier.GradingPool` unless the inputs are
    trusted. ``math_verify``'s own signal-based timeouts are off (they only work on the main
    thread of the main process).

    Returns:
        (equivalent, status), status one of :data:`SYMBOLIC_STATUSES`: ``gold_unparsed`` when
        the gold answer has no parse, ``pred_unparsed`` when the prediction has none.
    """
    from math_verify import parse, verify  # lazy: pulls in sympy (about 1 s)

    pred, gold = normalize(pred), normalize(gold)
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    if not _has_math(gold_parsed):
        return False, "gold_unparsed"
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    if not _has_math(pred_parsed):
        return False, "pred_unparsed"
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None)), "ok"


def _has_math(parsed: list) -> bool:
    """True when math_verify's parse holds a sympy object, not just the raw-string fallback it always adds."""
    return any(not isinstance(item, str) for item in parsed)


def is_equivalent(pred: str, gold: str) -> bool:
    """:func:`quick_verdict`, then :func:`symbolic_verdict` in this process, with no timeout.

    Never raises: errors give False. Use :func:`capo_lightning.rewards.math.math_reward` (hard
    timeouts) for model outputs; this is for trusted strings and tests.
    """
    verdict = quick_verdict(pred, gold)
    if verdict is not None:
        return verdict
    try:
        return symbolic_verdict(pred, gold)[0]
    except Exception:  # noqa: BLE001
        return False
