"""Final-answer extraction from model completions and gold solutions.

Pure string functions, no sympy: cheap enough to run in the training process on every
completion (only the last :data:`TAIL_CHARS` characters are searched, so a 100 kB
completion costs the same as a short one).
"""

from __future__ import annotations

import re

__all__ = ["TAIL_CHARS", "extract_answer", "last_boxed", "strip_math_delimiters"]

TAIL_CHARS = 4_000
"""Only this many trailing characters of a completion are searched for an answer."""

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
    value = strip_math_delimiters(value.strip(" *"))
    leading = _LEADING_NUMBER_THEN_WORDS.match(value)
    if leading:
        value = leading.group("num").rstrip(".,")
    return value or None


def strip_math_delimiters(text: str) -> str:
    r"""Removes surrounding ``$``, ``\(...\)``, ``\[...\]``, whitespace and a final period."""
    text = text.strip()
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opener) and text.endswith(closer):
            text = text[len(opener) : -len(closer)]
    text = text.strip().strip("$").strip()
    return text[:-1].rstrip() if text.endswith(".") else text
