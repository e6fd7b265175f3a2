"""Prompt sources: indexable sets of (question, gold answer) pairs.

``PromptSource.item(i)`` is a pure function of ``i`` and the constructor arguments,
so the data position of a run is a single integer and resume is exact. Sources here:
procedural arithmetic and a local JSONL file. Sources that wrap other libraries (a
``reasoning_gym`` task, a Hugging Face dataset) are in :mod:`capo_lightning.data.library_sources`,
the CHAMP set in :mod:`capo_lightning.data.champ`.
"""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ArithmeticSource", "JsonlSource", "PromptItem", "PromptSource"]

DEFAULT_INSTRUCTION = "Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class PromptItem:
    """One prompt with its gold answer.

    Attributes:
        prompt: The user question, without any chat template applied.
        answer: The gold answer string.
        columns: Extra dataset columns, passed to reward functions as keyword arguments.
    """

    prompt: str
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)


class PromptSource(ABC):
    """An indexable set of prompts.

    ``size`` is the number of distinct items, or None for an unbounded generator.
    ``item(i)`` must be a pure function of ``i`` (and constructor arguments such as a
    seed): the data position of a run is then just an integer, which makes resume
    exact. Valid indices are ``0 <= i < size`` (any ``i >= 0`` when unbounded).
    """

    @property
    @abstractmethod
    def size(self) -> int | None:
        """Number of distinct items, or None when unbounded."""

    @abstractmethod
    def item(self, index: int) -> PromptItem:
        """Returns the item at ``index``; raises IndexError outside the valid range."""

    def name(self) -> str:
        """Short name for logging; defaults to the class name."""
        return type(self).__name__

    def _check_index(self, index: int) -> None:
        """Raises IndexError unless ``index`` is valid for this source."""
        if index < 0 or (self.size is not None and index >= self.size):
            bound = "index >= 0" if self.size is None else f"0 <= index < {self.size}"
            raise IndexError(f"{self.name()}: index {index} is out of range; expected {bound}.")


def arg_error(source: object, arg: str, problem: str, fix: str) -> ValueError:
    """A ValueError naming the source, the config key of ``arg``, the problem and the fix."""
    return ValueError(
        f"{type(source).__name__}: invalid `{arg}` (config key `<source>.init_args.{arg}`, e.g. "
        f"`data.train_source.init_args.{arg}`): {problem}. Fix: {fix}."
    )


class ArithmeticSource(PromptSource):
    """Procedural integer arithmetic questions with exact answers; unbounded.

    Item ``i`` draws from ``random.Random(f"{seed}:{i}")``: string seeds go through
    SHA-512, not ``hash()``, so streams are stable across processes and no two
    ``(seed, i)`` pairs share one. Answers use the usual precedence (``*`` first).

    **Disjoint partitions** (``split``). Different seeds are not disjoint: every item is an
    independent draw from the same space (8,100 ordered pairs for two operands in 10..99).
    ``split=[lo, hi]`` keeps only the problems whose :func:`problem_hash` lies in ``[lo, hi)``: item
    ``i`` draws from its own stream until a problem falls in the split (the first draw in the split
    is the item, so it stays a pure function of ``seed`` and ``i``). The hash is of the problem
    itself, not of the seed or the index, and a sum or a product of one operator is hashed with its
    operands sorted, so ``27 + 97`` and ``97 + 27`` land in the same split. Sources whose splits do
    not overlap (``[0, 0.5]``, ``[0.5, 0.9]``, ``[0.9, 1]``) never share a problem, whatever their
    seeds.

    Args:
        seed: Selects the stream; different seeds give different questions.
        min_value: Smallest operand (inclusive); negative operands are parenthesised.
        max_value: Largest operand (inclusive).
        ops: Operators to draw from, a non-empty subset of ``+``, ``-``, ``*``.
        num_terms: Operands per question, at least 2.
        instruction: Appended to each question after a space; may be empty.
        split: ``[lo, hi]`` with ``0 <= lo < hi <= 1``: keep only problems whose hash lies in
            ``[lo, hi)``; None keeps every problem (and the stream is exactly the unsplit one).
    """

    SUPPORTED_OPS = ("+", "-", "*")
    MAX_DRAWS = 10_000  # draws per item before a split is declared (nearly) empty

    def __init__(
        self,
        seed: int = 0,
        min_value: int = 0,
        max_value: int = 99,
        ops: list[str] = ["+", "-", "*"],  # noqa: B006 - never mutated: copied below
        num_terms: int = 2,
        instruction: str = DEFAULT_INSTRUCTION,
        split: tuple[float, float] | None = None,
    ) -> None:
        self.seed, self.min_value, self.max_value = seed, min_value, max_value
        self.ops, self.num_terms, self.instruction = list(ops), num_terms, instruction
        self.split = None if split is None else (float(split[0]), float(split[1]))
        self._validate()

    def _validate(self) -> None:
        """Raises ValueError naming the first bad argument and its fix."""
        if self.max_value < self.min_value:
            problem = f"max_value={self.max_value} is smaller than min_value={self.min_value}"
            raise arg_error(self, "max_value", problem, "set max_value >= min_value")
        unknown = [op for op in self.ops if op not in self.SUPPORTED_OPS]
        if not self.ops or unknown:
            problem = f"unsupported operators {unknown}" if unknown else "the list is empty"
            raise arg_error(
                self, "ops", problem, f"use a non-empty subset of {list(self.SUPPORTED_OPS)}"
            )
        if self.num_terms < 2:
            raise arg_error(self, "num_terms", f"got {self.num_terms}", "use num_terms >= 2")
        if self.split is not None and not 0.0 <= self.split[0] < self.split[1] <= 1.0:
            raise arg_error(
                self, "split", f"got {list(self.split)}", "use [lo, hi] with 0 <= lo < hi <= 1"
            )

    @property
    def size(self) -> None:
        """Always None: the source is unbounded."""
        return None

    def name(self) -> str:
        """Returns ``"arithmetic"``."""
        return "arithmetic"

    def item(self, index: int) -> PromptItem:
        """Returns question ``index`` of this seed's stream (of its split, when one is set)."""
        self._check_index(index)
        rng = random.Random(f"{self.seed}:{index}")
        for _ in range(self.MAX_DRAWS):
            terms = [rng.randint(self.min_value, self.max_value) for _ in range(self.num_terms)]
            ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
            if self.split is None or self.split[0] <= problem_hash(terms, ops) < self.split[1]:
                return self._render(terms, ops)
        raise arg_error(
            self,
            "split",
            f"no problem of item {index} fell in {list(self.split)} after {self.MAX_DRAWS} draws "
            "(the split holds almost none of the problem space)",
            "widen the split or the operand range",
        )

    def _render(self, terms: list[int], ops: list[str]) -> PromptItem:
        """The question and its exact answer."""
        shown = [f"({term})" if term < 0 else str(term) for term in terms]
        expression = " ".join([shown[0], *(f"{op} {term}" for op, term in zip(ops, shown[1:]))])
        prompt = " ".join(part for part in (f"What is {expression}?", self.instruction) if part)
        return PromptItem(prompt=prompt, answer=str(_evaluate(terms, ops)))


def problem_hash(terms: list[int], ops: list[str]) -> float:
    """A problem's place in [0, 1): the first 8 bytes of SHA-256 of its canonical form, over 2^64.

    The canonical form is the expression itself, except that a chain of one commutative operator
    (all ``+`` or all ``*``) has its operands sorted first, so reordered copies of a problem share a
    hash (and a split).
    """
    if len(set(ops)) == 1 and ops[0] in ("+", "*"):
        terms = sorted(terms)
    canonical = " ".join([str(terms[0]), *(f"{op} {term}" for op, term in zip(ops, terms[1:]))])
    digest = hashlib.sha256(canonical.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _evaluate(terms: list[int], ops: list[str]) -> int:
    """Evaluates ``terms`` joined by ``ops``, ``*`` binding tighter than ``+``/``-``."""
    total, product, sign = 0, terms[0], 1
    for op, term in zip(ops, terms[1:]):
        if op == "*":
            product *= term
            continue
        total += sign * product
        sign, product = (1 if op == "+" else -1), term
    return total + sign * product


class JsonlSource(PromptSource):
    """Prompts from a local JSONL file, one JSON object per line.

    The whole file is read and validated at construction, so a bad row fails before
    training starts. Blank lines are skipped (but counted in line numbers). Keys other
    than the prompt and answer keys become ``columns``; numeric answers become strings.

    Args:
        path: The JSONL file.
        prompt_key: Key of the question; a non-empty string in every row.
        answer_key: Key of the gold answer; a non-empty string or a number.

    Raises:
        FileNotFoundError: If ``path`` is not an existing file.
        ValueError: If the file has no rows, or a row is invalid; the message names the
            file, the 1-based line number and the key.
    """

    def __init__(self, path: str, prompt_key: str = "prompt", answer_key: str = "answer") -> None:
        self.path, self.prompt_key, self.answer_key = str(path), prompt_key, answer_key
        self._items = self._load()

    @property
    def size(self) -> int:
        """Number of rows in the file."""
        return len(self._items)

    def name(self) -> str:
        """Returns ``"jsonl:<file stem>"``."""
        return f"jsonl:{Path(self.path).stem}"

    def item(self, index: int) -> PromptItem:
        """Returns the ``index``-th non-blank row (0-based)."""
        self._check_index(index)
        return self._items[index]

    def _load(self) -> list[PromptItem]:
        """Reads and validates every row."""
        file = Path(self.path)
        if not file.is_file():
            raise FileNotFoundError(
                f"JsonlSource: no such file: {self.path}. Fix: point `path` at a JSONL file."
            )
        items = []
        # bytes.splitlines splits on \n and \r only; str.splitlines would also split on U+2028
        # inside strings.
        for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise self._row_error(number, "the line is not valid UTF-8") from None
            if text.strip():
                items.append(self._parse_row(text, number))
        if not items:
            raise ValueError(
                f"JsonlSource: {self.path} contains no rows. Fix: write one JSON object per line "
                f"with keys {self.prompt_key!r} and {self.answer_key!r}."
            )
        return items

    def _row_error(self, number: int, problem: str) -> ValueError:
        """A ValueError naming the file, the line, the expected keys and the fix."""
        return ValueError(
            f"JsonlSource: {self.path}, line {number}: {problem}. Fix: every non-blank line must "
            f"be a JSON object with a non-empty string {self.prompt_key!r} and a string or number "
            f"{self.answer_key!r} (set prompt_key/answer_key if the file uses other names)."
        )

    def _parse_row(self, text: str, number: int) -> PromptItem:
        """Parses and validates one line."""
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise self._row_error(number, f"invalid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise self._row_error(number, f"expected a JSON object, got {type(row).__name__}")
        prompt, answer = row.pop(self.prompt_key, None), row.pop(self.answer_key, None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise self._row_error(
                number, f"key {self.prompt_key!r} is missing, empty or not a string"
            )
        if (
            isinstance(answer, bool)
            or not isinstance(answer, (str, int, float))
            or not str(answer).strip()
        ):
            raise self._row_error(
                number, f"key {self.answer_key!r} is missing, empty or not a string/number"
            )
        return PromptItem(prompt=prompt, answer=str(answer), columns=row)
