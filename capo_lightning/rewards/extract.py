"""Final-answer extraction from model completions and gold solutions.

Pure string functions, no sympy: cheap enough to run in the training process on every
completion. Only the end of a completion is searched (the last :data:`TAIL_CHARS`
characters; a box may open up to :data:`TAIL_CHARS` further back if it closes in them), so
a 100 kB completion costs about the same as a short one.
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
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", flags=re.DOTALL)
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"


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
    span = _last_box(text)
    return None if span is None else span[1]


def _last_box(text: str) -> tuple[int, str | None, int] | None:
    """``(start, content, end)`` of the last box command; content None if malformed, end -1 if
    unclosed."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    body = start + len(command)
    if text.startswith("{", body):
        end = _closing_brace(text, body)
        return start, (None if end < 0 else text[body + 1 : end]), end
    if text[body : body + 1].isspace():
        return start, _space_form_content(text[body:]), len(text)
    return start, None, -1


def _closing_brace(text: str, opening: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``text[opening]``, or -1 when it is never closed."""
    depth = 0
    for position in range(opening, len(text)):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return position
    return -1


def _space_form_content(text: str) -> str | None:
    """Returns the token after ``\\boxed `` (space form), or None if there is none."""
    token = text.lstrip()
    end = _SPACE_FORM_END.search(token)
    token = token[: end.start()] if end else token
    return token or None


def extract_answer(text: str) -> str | None:
    r"""Extracts the final answer from a completion.

    Reasoning is dropped first: every ``<think>...</think>`` block (an unclosed ``<think>``
    runs to the end), and everything before a ``</think>`` that has no opener (chat templates
    that open the thought in the prompt). An answer given only while thinking is no answer.
    Then, in the last :data:`TAIL_CHARS` characters, the rules in order:

    1. The content of a closed ``<answer>...</answer>`` block that ends after the last box
       (its own box if it holds one, else its "answer is" value, else its whole text).
    2. The content of the last box; it may open before the tail if it closes inside it, so
       answers up to :data:`TAIL_CHARS` long are read whole. An empty or unclosed last box
       gives None: the model committed to a boxed answer and botched it, so no stray
       number elsewhere is credited instead.
    3. The value after the last "answer is" / "Answer:" phrase, up to the end
       of its sentence (``The answer is 42 apples.`` gives ``42``).
    4. The last number in the text (``-3``, ``1,234``, ``3.5``, ``1/2``).

    Args:
        text: A model completion.

    Returns:
        The answer string, or None when nothing answer-like is found.
    """
    if "think>" in text:
        text = _THINK_BLOCK.sub(" ", text)
        text = text[text.rfind("</think>") + len("</think>") :] if "</think>" in text else text
    window = text[-2 * TAIL_CHARS :]
    tail_start = max(0, len(window) - TAIL_CHARS)
    box = _last_box(window)
    if box is not None and 0 <= box[2] < tail_start:
        box = None  # opened and closed before the tail: not an answer at the end
    tail = window[tail_start:]
    tagged = _answer_block(tail)
    if tagged is not None and (box is None or tail.rfind(_ANSWER_CLOSE) + tail_start > box[0]):
        return tagged or None
    if box is not None:
        return (box[1] or "").strip() or None
    tail = tail.replace("\u2212", "-")
    phrase = _answer_phrase(tail)
    if phrase:
        return phrase
    numbers = _LAST_NUMBER.findall(tail)
    return numbers[-1] if numbers else None


def _answer_block(text: str) -> str | None:
    """The answer inside the last closed ``<answer>...</answer>`` block ("" if blank), or None
    without one."""
    close = text.rfind(_ANSWER_CLOSE)
    opening = text.rfind(_ANSWER_OPEN, 0, max(close, 0))
    if close < 0 or opening < 0:
        return None
    content = text[opening + len(_ANSWER_OPEN) : close]
    if any(command in content for command in _BOX_COMMANDS):
        return (last_boxed(content) or "").strip()
    return _answer_phrase(content.replace("\u2212", "-")) or _clean_value(content)


def _answer_phrase(text: str) -> str | None:
    """Returns the cleaned value of the last "answer is X" phrase, or None."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    value = text[matches[-1].end() :].split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(value)
    value = value[: sentence_end.start()] if sentence_end else value
    return _clean_value(value) or None


def _clean_value(value: str) -> str:
    """Strips delimiters and ``**``; ``42 apples`` becomes ``42``."""
    value = strip_math_delimiters(value.strip(" *"))
    leading = _LEADING_NUMBER_THEN_WORDS.match(value)
    return leading.group("num").rstrip(".,") if leading else value


def strip_math_delimiters(text: str) -> str:
    r"""Removes surrounding ``$``, ``\(...\)``, ``\[...\]``, whitespace and a final period."""
    text = text.strip()
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opener) and text.endswith(closer):
            text = text[len(opener) : -len(closer)]
    text = text.strip().strip("$").strip()
    return text[:-1].rstrip() if text.endswith(".") else text
