"""Prompt sources: indexable sets of (question, gold answer) pairs.

``PromptSource.item(i)`` is a pure function of ``i`` and the constructor arguments,
so the data position of a run is a single integer and resume is exact. Sources:
procedural arithmetic, a local JSONL file, a ``reasoning_gym`` task (all offline),
and a Hugging Face dataset (needs ``datasets`` and, for remote data, Hub access).
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capo_lightning.rewards.math import last_boxed

__all__ = ["ArithmeticSource", "HFDatasetSource", "JsonlSource", "PromptItem", "PromptSource", "ReasoningGymSource"]

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


def _arg_error(source: object, arg: str, problem: str, fix: str) -> ValueError:
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

    Args:
        seed: Selects the stream; different seeds give different questions.
        min_value: Smallest operand (inclusive); negative operands are parenthesised.
        max_value: Largest operand (inclusive).
        ops: Operators to draw from, a non-empty subset of ``+``, ``-``, ``*``.
        num_terms: Operands per question, at least 2.
        instruction: Appended to each question after a space; may be empty.
    """

    SUPPORTED_OPS = ("+", "-", "*")

    def __init__(
        self,
        seed: int = 0,
        min_value: int = 0,
        max_value: int = 99,
        ops: list[str] = ["+", "-", "*"],  # noqa: B006 - never mutated: copied below
        num_terms: int = 2,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        self.seed, self.min_value, self.max_value = seed, min_value, max_value
        self.ops, self.num_terms, self.instruction = list(ops), num_terms, instruction
        self._validate()

    def _validate(self) -> None:
        """Raises ValueError naming the first bad argument and its fix."""
        if self.max_value < self.min_value:
            problem = f"max_value={self.max_value} is smaller than min_value={self.min_value}"
            raise _arg_error(self, "max_value", problem, "set max_value >= min_value")
        unknown = [op for op in self.ops if op not in self.SUPPORTED_OPS]
        if not self.ops or unknown:
            problem = f"unsupported operators {unknown}" if unknown else "the list is empty"
            raise _arg_error(self, "ops", problem, f"use a non-empty subset of {list(self.SUPPORTED_OPS)}")
        if self.num_terms < 2:
            raise _arg_error(self, "num_terms", f"got {self.num_terms}", "use num_terms >= 2")

    @property
    def size(self) -> None:
        """Always None: the source is unbounded."""
        return None

    def name(self) -> str:
        """Returns ``"arithmetic"``."""
        return "arithmetic"

    def item(self, index: int) -> PromptItem:
        """Returns question ``index`` of this seed's stream."""
        self._check_index(index)
        rng = random.Random(f"{self.seed}:{index}")
        terms = [rng.randint(self.min_value, self.max_value) for _ in range(self.num_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
        shown = [f"({term})" if term < 0 else str(term) for term in terms]
        expression = " ".join([shown[0], *(f"{op} {term}" for op, term in zip(ops, shown[1:]))])
        prompt = " ".join(part for part in (f"What is {expression}?", self.instruction) if part)
        return PromptItem(prompt=prompt, answer=str(_evaluate(terms, ops)))


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
            raise FileNotFoundError(f"JsonlSource: no such file: {self.path}. Fix: point `path` at a JSONL file.")
        items = []
        # bytes.splitlines splits on \n and \r only; str.splitlines would also split on U+2028 inside strings.
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
            f"JsonlSource: {self.path}, line {number}: {problem}. Fix: every non-blank line must be a JSON "
            f"object with a non-empty string {self.prompt_key!r} and a string or number {self.answer_key!r} "
            "(set prompt_key/answer_key if the file uses other names)."
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
            raise self._row_error(number, f"key {self.prompt_key!r} is missing, empty or not a string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise self._row_error(number, f"key {self.answer_key!r} is missing, empty or not a string/number")
        return PromptItem(prompt=prompt, answer=str(answer), columns=row)


class ReasoningGymSource(PromptSource):
    """Prompts from a ``reasoning_gym`` procedural task (works offline).

    Tested tasks: ``basic_arithmetic``, ``gsm_symbolic`` (GSM8K-style templates) and
    ``fraction_simplification``. Item ``i`` is the task's entry ``i`` with
    ``instruction`` appended; ``columns`` holds ``task`` and the JSON-safe ``metadata``.

    Caveats:
        * Some tasks (``basic_arithmetic``, ``fraction_simplification``) seed entry ``i``
          with ``seed + i``, so seeds 0 and 1 share all but one item. Keep train and
          validation seeds at least ``size`` apart.
        * ``math_reward`` grades value equality; ``fraction_simplification`` also asks
          for lowest terms, which only ``reasoning_gym``'s own scorer checks.

    Args:
        task: A registered ``reasoning_gym`` task name.
        size: Number of distinct items.
        seed: The task's seed.
        config: Extra task config, passed as keyword arguments to ``create_dataset``.
        instruction: Appended to each question after a space; may be empty.

    Raises:
        ImportError: If ``reasoning_gym`` is not installed.
        ValueError: If ``size`` < 1, the task is unknown or ``config`` is rejected.
    """

    def __init__(
        self,
        task: str = "basic_arithmetic",
        size: int = 1000,
        seed: int = 0,
        config: dict[str, Any] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        if size < 1:
            raise _arg_error(self, "size", f"got {size}", "use size >= 1")
        self.task, self._size, self.seed = task, size, seed
        self.config, self.instruction = dict(config or {}), instruction
        self._dataset = self._create_dataset()

    @property
    def size(self) -> int:
        """Number of distinct items."""
        return self._size

    def name(self) -> str:
        """Returns ``"rg:<task>"``."""
        return f"rg:{self.task}"

    def item(self, index: int) -> PromptItem:
        """Returns entry ``index`` of the task, with the instruction appended."""
        self._check_index(index)
        entry = self._dataset[index]
        prompt = " ".join(part for part in (str(entry["question"]).strip(), self.instruction) if part)
        columns = {"task": self.task, "metadata": _json_safe(entry.get("metadata", {}))}
        return PromptItem(prompt=prompt, answer=str(entry["answer"]), columns=columns)

    def _create_dataset(self) -> Any:
        """Imports ``reasoning_gym`` lazily and builds the task's dataset."""
        try:
            import reasoning_gym
        except ImportError as error:
            raise ImportError("ReasoningGymSource needs reasoning-gym: pip install reasoning-gym") from error
        try:
            return reasoning_gym.create_dataset(self.task, size=self.size, seed=self.seed, **self.config)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"ReasoningGymSource: reasoning_gym rejected task={self.task!r} with config={self.config}: {error}. "
                "Fix: use a registered task (reasoning_gym.factory.DATASETS) and only that task's config fields."
            ) from error


def _json_safe(metadata: dict[str, Any]) -> dict[str, Any]:
    """Keeps the JSON-serialisable entries of ``metadata``, round-tripped (tuples become lists)."""
    safe = {}
    for key, value in metadata.items():
        try:
            safe[str(key)] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return safe


class HFDatasetSource(PromptSource):
    r"""Prompts from a Hugging Face dataset such as MATH; needs ``datasets``.

    Loads ``datasets.load_dataset(path, name, split=split, data_files=data_files)`` at
    construction (``path="json"`` with ``data_files`` reads local files). With
    ``extract_boxed`` the gold answer is the last ``\boxed{...}`` of the ``answer_key``
    column, nested braces handled; every row must have one. Other columns go to ``columns``.

    Args:
        path: Dataset name on the Hub, or a builder such as ``"json"``.
        name: Dataset configuration name, if any.
        split: The split to load.
        prompt_key: Column holding the question.
        answer_key: Column holding the answer, or the full solution.
        extract_boxed: Take the last ``\boxed{}`` of ``answer_key`` as the answer.
        data_files: Files for builders such as ``"json"``.

    Raises:
        ImportError: If ``datasets`` is not installed.
        ValueError: If a key is not a column, or (with ``extract_boxed``) a row has no box.
    """

    def __init__(
        self,
        path: str = "DigitalLearningGmbH/MATH-lighteval",
        name: str | None = None,
        split: str = "train",
        prompt_key: str = "problem",
        answer_key: str = "solution",
        extract_boxed: bool = True,
        data_files: str | None = None,
    ) -> None:
        self.path, self.prompt_key, self.answer_key = path, prompt_key, answer_key
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                "HFDatasetSource needs the datasets package: pip install datasets "
                "(JsonlSource and ReasoningGymSource work without it)"
            ) from error
        self._dataset = datasets.load_dataset(path, name, split=split, data_files=data_files)
        for arg, key in (("prompt_key", prompt_key), ("answer_key", answer_key)):
            if key not in self._dataset.column_names:
                problem = f"column {key!r} not in {path} (columns: {self._dataset.column_names})"
                raise _arg_error(self, arg, problem, f"set {arg} to one of the columns")
        self._answers = self._gold_answers(extract_boxed)

    @property
    def size(self) -> int:
        """Number of rows in the split."""
        return len(self._answers)

    def name(self) -> str:
        """Returns ``"hf:<path>"``."""
        return f"hf:{self.path}"

    def item(self, index: int) -> PromptItem:
        """Returns row ``index`` of the split."""
        self._check_index(index)
        row = dict(self._dataset[index])
        prompt = str(row.pop(self.prompt_key))
        row.pop(self.answer_key)
        return PromptItem(prompt=prompt, answer=self._answers[index], columns=row)

    def _gold_answers(self, extract_boxed: bool) -> list[str]:
        """All gold answers, extracted up front so that a bad row fails at construction."""
        raw = [str(value) for value in self._dataset[self.answer_key]]
        if not extract_boxed:
            return raw
        answers = [last_boxed(text) or "" for text in raw]
        missing = [index for index, answer in enumerate(answers) if not answer.strip()]
        if missing:
            problem = f"{len(missing)} rows (first: row {missing[0]}) have no non-empty \\boxed{{}}"
            fix = f"set extract_boxed=false if {self.answer_key!r} holds final answers, or filter those rows out"
            raise _arg_error(self, "extract_boxed", problem, fix)
        return answers
