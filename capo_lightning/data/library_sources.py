"""Prompt sources backed by other libraries: reasoning_gym (offline task generators) and datasets (Hub data).

Both libraries are optional extras (``offline`` and ``hub``) and are imported lazily.
"""

from __future__ import annotations

import json
from typing import Any

from capo_lightning.data.prompts import DEFAULT_INSTRUCTION, PromptItem, PromptSource, _arg_error
from capo_lightning.rewards.math import last_boxed

__all__ = ["HFDatasetSource", "ReasoningGymSource"]


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
