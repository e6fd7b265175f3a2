r"""Answer equivalence: exact fast paths in-process, symbolic comparison with math-verify.

:func:`quick_verdict` decides what needs no sympy (identical normalised strings, numbers compared
as exact fractions, multiple-choice letters, inputs refused by the guard of
:mod:`~capo_lightning.rewards.sympy_guard`). :func:`symbolic_verdict` runs ``math_verify`` and can
take unbounded time on adversarial input, so :mod:`capo_lightning.rewards.verifier` runs it in a
worker process under a hard wall-clock timeout. :func:`is_equivalent` chains both in the calling
process, without a timeout.

Judgement calls, made the same way on both sides of a comparison:

* Percent signs are dropped: ``50\%`` equals ``50`` and ``50\%``, but not ``0.5`` (the answer
  to "what percent" is 50; ``0.5`` would be half a percent).
* Trailing units (``5 \text{ cm}``, ``10\,\mathrm{m}``, ``\text{5 dollars}``) and degree signs
  (``30^\circ``) are dropped, so ``45^\circ`` equals ``45``, not ``\frac{\pi}{4}``.
* ``2\frac{1}{2}`` is the mixed number 5/2 (a whole number directly before a proper fraction).
* ``1.5e3`` is scientific notation (1500), not ``1.5 e \cdot 3``.
* ``x = 3`` equals ``3`` when the other side is no equation.
* Units are ignored even when both sides have one, so ``5 \text{ hours}`` equals ``5 \text{ min}``.
* A gold multiple-choice letter (``B``, ``(B)``, ``\text{(B)}``) is matched by a predicted
  letter in any of those forms, also followed by the option's text: ``(B) 12``.
"""

from __future__ import annotations

import re
from fractions import Fraction

from capo_lightning.rewards.extract import strip_math_delimiters
from capo_lightning.rewards.sympy_guard import is_pathological

__all__ = ["as_number", "is_equivalent", "normalize", "quick_verdict", "symbolic_verdict"]

MAX_NUMBER_CHARS = 4_000
"""Longer numbers are not parsed (Python refuses ``int`` of more than 4300 digits)."""

_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_REWRITES = [
    (re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])\s*\.?"), ""),
    (re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\frac\s*([0-9A-Za-z]|\\[A-Za-z]+)"), r"\\frac{\1}"),  # \frac12, \frac\pi2
    (re.compile(r"\\frac\s*(\{[^{}]*\})\s*([0-9A-Za-z]|\\[A-Za-z]+)"), r"\\frac\1{\2}"),
    (re.compile(r"(?<!\\)\\(?:[,!;: ]|q?quad(?![A-Za-z]))|\\displaystyle"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\?\$|\\?%"), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])"), ""),
    (re.compile(r"\\varnothing"), r"\\emptyset"),
    (re.compile(r"(?<![\w\\.^_])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])"), r"\1\\times10^{\2}"),
]
_TEXT = r"\\(?:textrm|textnormal|textit|text|mbox|mathrm|rm)\s*"
_TRAILING_UNIT = re.compile(_TEXT + r"\{\s*[A-Za-z][A-Za-z\s./-]*\}(?:\s*\^\s*\{?\d\}?)?$")
_NUMBER_IN_TEXT = re.compile("^" + _TEXT + r"\{\s*(-?[\d.,]+)\s+[A-Za-z][A-Za-z\s./-]*\}$")
_SIGN_SPACE = re.compile(r"^([+-])\s+")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_PLAIN_FRACTION = re.compile(r"^(?P<sign>[+-]?)(?P<num>-?\d+)/(?P<den>\d+)$")
_LATEX_FRACTION = re.compile(r"^(?P<sign>[+-]?)\\frac\{(?P<num>-?\d+)\}\{(?P<den>\d+)\}$")
_MIXED_NUMBER = re.compile(
    r"^(?P<sign>[+-]?)(?P<whole>\d+)\s*\\frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}$"
)
_SCIENTIFIC = re.compile(
    r"^(?P<sign>[+-]?)(?:(?P<mantissa>\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|\*)\s*)?"
    r"10\s*\^\s*(?:\{\s*(?P<braced>[+-]?\d+)\s*\}|(?P<digit>\d))$"
)
_REPEATING = re.compile(
    r"^(?P<sign>[+-]?)(?P<whole>\d*)\.(?P<fixed>\d*)\\overline\{(?P<period>\d+)\}$"
)
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?P<value>[^=]+)$")
_CHOICE_MARKUP = re.compile(_TEXT.replace("textrm", "textbf|textrm|mathbf") + "|[{}\\s]")
_CHOICE = re.compile(r"^\(?(?P<letter>[A-E])\)?$")
_CHOICE_WITH_TEXT = re.compile(r"\((?P<letter>[A-E])\)")


def normalize(text: str) -> str:
    r"""Canonical surface form used for string equality, the number fast path and math_verify's
    input.

    Drops invisible characters, math delimiters, ``\left``/``\right``, thin spaces, ``\$``,
    percent and degree signs and trailing units; writes ``\dfrac``/``\tfrac``/``\frac12`` as
    ``\frac{1}{2}``, ``1{,}000`` as ``1,000`` and ``1.5e3`` as ``1.5\times10^{3}``.
    """
    text = _INVISIBLE.sub("", str(text)).replace("\u2212", "-").replace("\u00d7", "\\times ")
    text = strip_math_delimiters(text)
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    text = _NUMBER_IN_TEXT.sub(r"\1", text.strip())
    for _ in range(2):
        without_unit = _TRAILING_UNIT.sub("", text).rstrip()
        text = without_unit if without_unit else text
    return text.strip()


def as_number(text: str) -> Fraction | None:
    r"""Parses a number written without variables exactly, or returns None.

    Accepted: ``-1,234.5``, ``.5``, ``1/2``, ``\frac{1}{2}``, mixed numbers ``2\frac{1}{2}``
    (proper fraction only), scientific ``1.5\times10^{3}`` / ``10^{-2}`` (at most
    :data:`MAX_NUMBER_CHARS` digits in all) and repeating decimals ``0.\overline{3}``. Refused:
    malformed thousands groups such as ``1,23`` (those could be tuples) and zero denominators.
    """
    if len(text) > MAX_NUMBER_CHARS:
        return None
    compact = _SIGN_SPACE.sub(r"\1", text)
    if _PLAIN_NUMBER.match(compact):
        return Fraction(compact.replace(",", ""))
    sign = -1 if compact.startswith("-") else 1
    if match := _PLAIN_FRACTION.match(compact) or _LATEX_FRACTION.match(compact):
        den = int(match.group("den"))
        return sign * Fraction(int(match.group("num")), den) if den else None
    if match := _MIXED_NUMBER.match(compact):
        num, den = int(match.group("num")), int(match.group("den"))
        return sign * (int(match.group("whole")) + Fraction(num, den)) if 0 < num < den else None
    if match := _SCIENTIFIC.match(compact):
        mantissa, exponent = (
            match.group("mantissa") or "1",
            int(match.group("braced") or match.group("digit")),
        )
        if abs(exponent) + len(mantissa) > MAX_NUMBER_CHARS:
            return None
        return sign * Fraction(mantissa) * Fraction(10) ** exponent
    if match := _REPEATING.match(compact):
        fixed, period = match.group("fixed"), match.group("period")
        value = int(match.group("whole") or 0) + Fraction(int(fixed or 0), 10 ** len(fixed))
        return sign * (value + Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed)))
    return None


def _choice_letter(text: str, with_text: bool) -> str | None:
    r"""The multiple-choice letter ``A``-``E`` of ``B``, ``(B)``, ``\text{(B)}``, ``\textbf{B}``, or
    None.

    With ``with_text``, ``(B) 12`` and ``\textbf{(B) } 12`` count too (the option's text follows),
    but not ``(B) or (C)``: a hedge between options is no letter.
    """
    bare = _CHOICE_MARKUP.sub("", text)
    if match := _CHOICE.match(bare):
        return match.group("letter")
    match = _CHOICE_WITH_TEXT.match(bare) if with_text else None
    hedged = match is not None and _CHOICE_WITH_TEXT.search(bare, match.end())
    return match.group("letter") if match and not hedged else None


def quick_verdict(pred: str, gold: str) -> bool | None:
    r"""Decides equivalence without sympy where that is exact; None means
    "ask :func:`symbolic_verdict`".

    After :func:`normalize`: True for identical strings; for a gold multiple-choice letter and a
    predicted letter, whether the letters agree; for two numbers (see :func:`as_number`) the
    exact fraction comparison, so ``0.333`` is *not* ``1/3``; False for empty sides and for inputs
    the :func:`~capo_lightning.rewards.sympy_guard.is_pathological` guard refuses. ``x = 3`` is
    read as ``3`` when the other side has no ``=``. Takes microseconds; never raises.
    """
    try:
        pred, gold = normalize(pred), normalize(gold)
        if not pred or not gold:
            return False
        if pred == gold:
            return True
        gold_letter = _choice_letter(gold, with_text=False)
        pred_letter = _choice_letter(pred, with_text=True) if gold_letter else None
        if pred_letter:
            return pred_letter == gold_letter
        pred_value, gold_value = _value_side(pred, gold), _value_side(gold, pred)
        if pred_value == gold_value:
            return True
        pred_number, gold_number = as_number(pred_value), as_number(gold_value)
        if pred_number is not None and gold_number is not None:
            return pred_number == gold_number
        if is_pathological(pred) or is_pathological(gold):
            return False
        return None
    except Exception:  # noqa: BLE001 - a grader must never crash the training loop
        return False


def _value_side(text: str, other: str) -> str:
    """``3`` for ``x = 3`` when ``other`` has no ``=``; else ``text``."""
    match = _ASSIGNMENT.match(text) if "=" not in other else None
    return match.group("value").strip() if match else text


SYMBOLIC_STATUSES = ("ok", "pred_unparsed", "gold_unparsed")
"""What :func:`symbolic_verdict` reports besides the verdict."""


def symbolic_verdict(pred: str, gold: str) -> tuple[bool, str]:
    """Compares with ``math_verify`` (sympy) after :func:`normalize`; may run for minutes on
    adversarial input.

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
    """True when math_verify's parse holds a sympy object, not just the raw-string fallback it
    always adds."""
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
