"""Prompt sources backed by other libraries: reasoning_gym (offline) and datasets (Hub data or local
files).

Both are optional extras (``offline``: reasoning-gym; ``hub``: datasets) and are imported lazily.
The CHAMP evaluation set (champ-dataset) is in :mod:`capo_lightning.data.champ`.
"""

from __future__ import annotations

import json
from typing import Any

from capo_lightning.data.prompts import DEFAULT_INSTRUCTION, PromptItem, PromptSource, arg_error
from capo_lightning.rewards.extract import last_boxed

__all__ = ["ANSWER_FORMATS", "HFDatasetSource", "ReasoningGymSource"]


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
            raise arg_error(self, "size", f"got {size}", "use size >= 1")
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
        prompt = " ".join(
            part for part in (str(entry["question"]).strip(), self.instruction) if part
        )
        columns = {"task": self.task, "metadata": _json_safe(entry.get("metadata", {}))}
        return PromptItem(prompt=prompt, answer=str(entry["answer"]), columns=columns)

    def _create_dataset(self) -> Any:
        """Imports ``reasoning_gym`` lazily and builds the task's dataset."""
        try:
            import reasoning_gym
        except ImportError as error:
            raise ImportError(
                "ReasoningGymSource needs reasoning-gym: pip install reasoning-gym"
            ) from error
        try:
            return reasoning_gym.create_dataset(
                self.task, size=self.size, seed=self.seed, **self.config
            )
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"ReasoningGymSource: reasoning_gym rejected task={self.task!r} with "
                f"config={self.config}: {error}. Fix: use a registered task "
                "(reasoning_gym.factory.DATASETS) and only that task's config fields."
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


ANSWER_FORMATS = ("boxed", "gsm8k", "raw")
"""Values of ``HFDatasetSource(answer_format=...)``."""


def _gsm8k_answer(text: str) -> str | None:
    """Returns what follows the last ``####``, commas removed (``"... #### 1,234"`` gives
    ``"1234"``)."""
    marker = text.rfind("####")
    return None if marker < 0 else text[marker + 4 :].strip().replace(",", "")


_EXTRACTORS = {"boxed": last_boxed, "gsm8k": _gsm8k_answer, "raw": lambda text: text}
_MISSING = {
    "boxed": "no non-empty \\boxed{}",
    "gsm8k": "no answer after a final ####",
    "raw": "an empty answer",
}


class HFDatasetSource(PromptSource):
    r"""Prompts from a Hugging Face dataset such as MATH or GSM8K; needs ``datasets``.

    Loads ``datasets.load_dataset(path, name, split=split, data_files=data_files)`` at
    construction: Hub names need Hub access; builders such as ``"json"`` or ``"parquet"``
    with ``data_files`` read local files offline. Item ``i`` is row ``i`` with ``instruction``
    appended; the other columns go to ``columns``. Every row must yield a non-empty gold
    answer from the ``answer_key`` column, read according to ``answer_format``: ``"boxed"``,
    the last ``\boxed{...}`` (nested braces handled; MATH solutions); ``"gsm8k"``, the text
    after the last ``####`` without commas (``"... #### 1,234"`` gives ``"1234"``); ``"raw"``,
    the column as it is (a final-answer column, as in MATH-500).

    Args:
        path: Dataset name on the Hub, or a builder such as ``"json"`` or ``"parquet"``.
        name: Dataset configuration name, if any (GSM8K: ``"main"``).
        split: The split to load.
        prompt_key: Column holding the question.
        answer_key: Column holding the answer, or the full solution.
        answer_format: One of :data:`ANSWER_FORMATS`, see above.
        data_files: Files for builders such as ``"json"`` and ``"parquet"``.
        instruction: Appended to each question after a space; may be empty.

    Raises:
        ImportError: If ``datasets`` is not installed.
        ValueError: If ``answer_format`` is unknown, a key is not a column, or a row has no answer.
    """

    def __init__(
        self,
        path: str = "DigitalLearningGmbH/MATH-lighteval",
        name: str | None = None,
        split: str = "train",
        prompt_key: str = "problem",
        answer_key: str = "solution",
        answer_format: str = "boxed",
        data_files: str | list[str] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        if answer_format not in ANSWER_FORMATS:
            raise arg_error(
                self,
                "answer_format",
                f"got {answer_format!r}",
                f"use one of {list(ANSWER_FORMATS)}",
            )
        self.path, self.prompt_key, self.answer_key = path, prompt_key, answer_key
        self.answer_format, self.instruction = answer_format, instruction
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                "HFDatasetSource needs the datasets package: pip install datasets "
                "(JsonlSource, ReasoningGymSource and ChampSource work without it)"
            ) from error
        self._dataset = datasets.load_dataset(path, name, split=split, data_files=data_files)
        for arg, key in (("prompt_key", prompt_key), ("answer_key", answer_key)):
            if key not in self._dataset.column_names:
                problem = f"column {key!r} not in {path} (columns: {self._dataset.column_names})"
                raise arg_error(self, arg, problem, f"set {arg} to one of the columns")
        self._answers = self._gold_answers()

    @property
    def size(self) -> int:
        """Number of rows in the split."""
        return len(self._answers)

    def name(self) -> str:
        """Returns ``"hf:<path>"``."""
        return f"hf:{self.path}"

    def item(self, index: int) -> PromptItem:
        """Returns row ``index`` of the split, with the instruction appended."""
        self._check_index(index)
        row = dict(self._dataset[index])
        prompt = " ".join(
            part for part in (str(row.pop(self.prompt_key)).strip(), self.instruction) if part
        )
        row.pop(self.answer_key)
        return PromptItem(prompt=prompt, answer=self._answers[index], columns=row)

    def _gold_answers(self) -> list[str]:
        """All gold answers, extracted up front so that a bad row fails at construction."""
        extract = _EXTRACTORS[self.answer_format]
        answers = [
            (extract("" if value is None else str(value)) or "").strip()
            for value in self._dataset[self.answer_key]
        ]
        missing = [index for index, answer in enumerate(answers) if not answer]
        if missing:
            gives = _MISSING[self.answer_format]
            problem = (
                f"{len(missing)} rows (first: row {missing[0]}) of {self.answer_key!r} give {gives}"
            )
            others = [f for f in ANSWER_FORMATS if f != self.answer_format]
            fix = (
                f"pick the answer_format that matches {self.answer_key!r} ({others}), or filter "
                "those rows out"
            )
            raise arg_error(self, "answer_format", problem, fix)
        return answers
