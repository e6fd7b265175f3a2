"""Rule-based rewards for verifiable math answers.

The pipeline for one completion is: take the tail of the text, extract the final
answer (last ``\\boxed{}``, else an "answer is X" phrase, else the last number),
then compare it with the gold answer. Plain numbers are compared exactly with
:class:`fractions.Fraction`; everything else goes to ``math_verify``.

``math_verify`` runs sympy, which can hang on some inputs (``9^{9^{9}}`` makes
``verify`` run for minutes). Its built-in timeouts use ``signal.alarm``, which
only works on the main thread, so they are switched off here
(``parsing_timeout=None``, ``timeout_seconds=None``). Instead, :func:`is_equivalent`
refuses long strings and exponent towers up front and grades them 0.0. That guard
is a heuristic, not a wall-clock limit; a later change adds a process-based timeout.

Every reward function returns one float per completion and never raises on bad
text; only a length mismatch between completions and answers is an error.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

__all__ = ["extract_answer", "format_reward", "is_equivalent", "last_boxed", "math_reward"]

TAIL_CHARS = 4_000
"""Only this many trailing characters of a completion are searched for an answer."""

MAX_VERIFY_CHARS = 300
"""Strings longer than this are never handed to sympy (graded as not equivalent)."""

MAX_EXPONENTS = 2
"""More exponent operators than this in one string is treated as pathological."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_SPACE_FORM_END = re.compile(r"[\s$]")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:|=)\s*\**\s*:?\s*", flags=re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_LEADING_NUMBER_THEN_WORDS = re.compile(r"^(?P<num>-?[\d.,/]+)\s+[A-Za-z]{2}")
_LAST_NUMBER = re.compile(
    r"(?<![\w)\]}])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])"  # 1,234 / -1,234.5
    r"|(?<![\w)\]}])-?\d+(?:\.\d+)?(?:/\d+)?"  # -3 / 3.5 / 1/2
    r"|\d+(?:\.\d+)?(?:/\d+)?"  # a number right after a letter or bracket: no sign
)
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_SIGN_SPACE = re.compile(r"^([+-])\s+")
_PLAIN_FRACTION = re.compile(r"^(?P<sign>[+-]?)(?P<num>\d+)/(?P<den>\d+)$")
_LATEX_FRACTION = re.compile(r"^(?P<sign>[+-]?)\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}$")
_BIG_FACTORIAL = re.compile(r"\d{5,}\s*!")
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*\d{6,}")


def last_boxed(text: str) -> str | None:
    r"""Returns the content of the last ``\boxed{...}`` or ``\fbox{...}`` in ``text``.

    Nested braces are matched, so ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``.
    The space form ``\boxed 5`` gives ``5`` (up to the next space or ``$``).

    Args:
        text: Any text, typically a model completion.

    Returns:
        The box content (may be ``""`` for ``\boxed{}``), or None when there is no
        box or the last box is not closed.
    """
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest = text[start + len(command) :]
    if rest.startswith("{"):
        return _braced_content(rest)
    if rest[:1].isspace():
        return _space_form_content(rest)
    return None


def _braced_content(text: str) -> str | None:
    """Returns what lies between ``text[0] == "{"`` and its matching ``}``, or None."""
    depth = 0
    for position, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[1:position]
    return None


def _space_form_content(text: str) -> str | None:
    """Returns the token after ``\\boxed `` (space form), or None if there is none."""
    token = text.lstrip()
    end = _SPACE_FORM_END.search(token)
    token = token[: end.start()] if end else token
    return token or None


def extract_answer(text: str) -> str | None:
    r"""Extracts the final answer from a completion.

    Only the last :data:`TAIL_CHARS` characters are searched, so very long
    completions stay cheap. The rules, in order:

    1. If the tail contains a box command, the content of the last box. An empty
       or unclosed last box gives None: the model committed to a boxed answer and
       botched it, so no stray number elsewhere is credited instead.
    2. The value after the last "answer is" / "Answer:" phrase, up to the end
       of its sentence (``The answer is 42 apples.`` gives ``42``).
    3. The last number in the text (``-3``, ``1,234``, ``3.5``, ``1/2``).

    Args:
        text: A model completion.

    Returns:
        The answer string, or None when nothing answer-like is found.
    """
    tail = text[-TAIL_CHARS:]
    if any(command in tail for command in _BOX_COMMANDS):
        boxed = (last_boxed(tail) or "").strip()
        return boxed or None
    tail = tail.replace("\u2212", "-")
    phrase = _answer_phrase(tail)
    if phrase:
        return phrase
    numbers = _LAST_NUMBER.findall(tail)
    return numbers[-1] if numbers else None


def _answer_phrase(text: str) -> str | None:
    """Returns the cleaned value of the last "answer is X" phrase, or None."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    value = text[matches[-1].end() :].split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(value)
    value = value[: sentence_end.start()] if sentence_end else value
    value = _strip_math_delimiters(value.strip(" *"))
    leading = _LEADING_NUMBER_THEN_WORDS.match(value)
    if leading:
        value = leading.group("num").rstrip(".,")
    return value or None


def _strip_math_delimiters(text: str) -> str:
    r"""Removes surrounding ``$``, ``\(...\)``, ``\[...\]``, whitespace and a final period."""
    text = text.strip()
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opener) and text.endswith(closer):
            text = text[len(opener) : -len(closer)]
    text = text.strip().strip("$").strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _normalize(text: str) -> str:
    """Canonical surface form used for string equality and the number fast path."""
    text = _strip_math_delimiters(str(text).replace("\u2212", "-"))
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


def is_equivalent(pred: str, gold: str) -> bool:
    r"""Decides whether a predicted answer equals the gold answer.

    Fast paths: identical normalised strings are equal; if both sides are plain
    numbers (``$``, thousands commas, trailing ``.0``, unicode minus,
    ``a/b`` and ``\frac{a}{b}`` allowed) they are compared exactly as fractions,
    so ``0.333`` is *not* ``1/3``. Otherwise both are wrapped in ``$...$`` and
    compared with ``math_verify`` (symbolic equality, sets, intervals, ...).

    Args:
        pred: The extracted model answer.
        gold: The reference answer.

    Returns:
        True if equivalent. Never raises: errors, empty strings and inputs that
        could hang sympy (see :func:`_is_pathological`) give False.
    """
    try:
        return _is_equivalent(pred, gold)
    except Exception:  # noqa: BLE001 - a grader must never crash the training loop
        return False


def _is_equivalent(pred: str, gold: str) -> bool:
    """The body of :func:`is_equivalent`, allowed to raise."""
    pred, gold = _normalize(pred), _normalize(gold)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    pred_number, gold_number = _as_number(pred), _as_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    if _is_pathological(pred) or _is_pathological(gold):
        return False
    return _math_verify_equal(pred, gold)


def _math_verify_equal(pred: str, gold: str) -> bool:
    """Symbolic comparison with ``math_verify``; signal-based timeouts are disabled."""
    from math_verify import parse, verify  # lazy: pulls in sympy (about 1 s)

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _check_lengths(completions: list[str], answers: list[str]) -> None:
    """Raises ValueError unless there is exactly one answer per completion."""
    if len(completions) != len(answers):
        raise ValueError(
            f"Got {len(completions)} completions but {len(answers)} answers; "
            "pass exactly one gold answer per completion (repeat each answer once per "
            "sample of its prompt)."
        )


def _gold_answer(answer: Any) -> str:
    r"""The gold string to compare against: the last box if the gold has one."""
    text = str(answer)
    boxed = last_boxed(text)
    return boxed if boxed else text


def _score(completion: Any, answer: Any) -> float:
    """1.0 if the completion's extracted answer matches ``answer``, else 0.0."""
    try:
        pred = extract_answer(str(completion))
        return float(pred is not None and is_equivalent(pred, _gold_answer(answer)))
    except Exception:  # noqa: BLE001 - a grader must never crash the training loop
        return 0.0


def math_reward(completions: list[str], answers: list[str], **columns: Any) -> list[float]:
    """Scores each completion 1.0 if its final answer matches the gold answer, else 0.0.

    Args:
        completions: Model outputs (text after the prompt).
        answers: Gold answers, one per completion. A gold answer containing a
            ``\\boxed{}`` (e.g. a full solution) is reduced to its last box.
        **columns: Extra dataset columns; accepted for a uniform reward signature
            and ignored.

    Returns:
        One float per completion, in order. Never raises on malformed text.

    Raises:
        ValueError: If ``completions`` and ``answers`` differ in length.
    """
    _check_lengths(completions, answers)
    return [_score(completion, answer) for completion, answer in zip(completions, answers)]


def format_reward(completions: list[str], answers: list[str], **columns: Any) -> list[float]:
    r"""Scores 1.0 per completion whose last box is closed and non-empty, else 0.0.

    Only the last :data:`TAIL_CHARS` characters are searched, like
    :func:`extract_answer`. Correctness is not checked.

    Args:
        completions: Model outputs.
        answers: Gold answers; only their count is used.
        **columns: Extra dataset columns, ignored.

    Returns:
        One float per completion, in order.

    Raises:
        ValueError: If ``completions`` and ``answers`` differ in length.
    """
    _check_lengths(completions, answers)
    return [float(bool((last_boxed(str(c)[-TAIL_CHARS:]) or "").strip())) for c in completions]
