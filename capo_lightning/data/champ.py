"""The CHAMP competition problems (champ-dataset, offline) as a prompt source, answers cleaned for
grading."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from capo_lightning.data.prompts import DEFAULT_INSTRUCTION, PromptItem, PromptSource, arg_error
from capo_lightning.rewards.grading import quick_verdict

__all__ = ["ChampSource", "champ_answer", "champ_gradeable"]

# CHAMP answers are plain-text formulas or sentences; these rewrites strip the gloss off a formula.
_CHAMP_REWRITES = [
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\s+\((?:i\.e\.,|no |none ).*\)$", ""),  # "100 (i.e., all values)" -> "100"
        # "C(10, 5), or equivalently 252" -> "252"
        (r"^.*, or (?:equivalently|an equivalent form such as) ", ""),
        (r", or approximately .*$", ""),  # "5/14, or approximately 35.7%" -> "5/14"
        (r" is the only possible value$", ""),  # "3 is the only possible value" -> "3"
        (r"^The (?:limit exists and is equal to|only possible value for the limit is) ", ""),
        (r"^(\d+) (?:roots|pairs|values|inequalities)$", r"\1"),  # "0 roots" -> "0"
    )
]
_CHAMP_MISREAD = re.compile(r"\bC\(|\.\.\.|±.*,")  # C(n, k) is read as a function C, not a binomial


def _is_formula(answer: str) -> bool:
    """True for a formula that math_verify reads as meant and the grader does not refuse.

    Not formulas: text with a word (a run of 3+ letters other than ``sqrt``, or a token of 2+
    letters), notations math_verify misreads (``C(n, k)``, ``...``, lists of ``±`` values) and
    strings :func:`quick_verdict` refuses against anything (e.g. more than two exponents).
    """
    words = [run for run in re.findall(r"[A-Za-z]{3,}", answer) if run != "sqrt"]
    words += [token for token in re.split(r"[\s,]+", answer) if len(token) > 1 and token.isalpha()]
    return (
        not words and not _CHAMP_MISREAD.search(answer) and quick_verdict("x", answer) is not False
    )


def champ_answer(answer: str) -> str:
    """Applies the CHAMP gloss rewrites; parts joined by ``" and "`` become a comma list of
    formulas."""
    for pattern, replacement in _CHAMP_REWRITES:
        answer = pattern.sub(replacement, answer)
    parts = answer.split(" and ")
    if len(parts) > 1 and all(_is_formula(part) for part in parts):  # "x=1, y=1 and x=3, y=2"
        answer = ", ".join(
            f"({part})" if "=" in part and "," in part and part[0] != "(" else part
            for part in parts
        )
    return answer.strip()


def champ_gradeable(answer: str) -> bool:
    """True for answers (after :func:`champ_answer`) that ``math_reward`` can grade: formulas, Yes,
    No."""
    return answer in ("Yes", "No") or _is_formula(answer)


class ChampSource(PromptSource):
    """The 270 CHAMP competition problems (Mao et al., 2024) from ``champ-dataset``; works offline.

    A held-out evaluation set in 5 categories (Combinatorics, Inequality, Number-Theory,
    Polynomial, Sequence). Items follow the natural order of problem ids (``P_Combinatorics_1``,
    ..., ``P_Sequence_50``) after filtering; prompts are the problem text plus ``instruction``;
    ``columns`` hold ``problem_id``, ``category`` and ``original_answer``. Answers go through
    :func:`champ_answer` (``"100 (i.e., all values)"`` gives ``"100"``). ``gradeable_only`` drops
    sentence answers (``"The limit does not exist"``) and notations the grader misreads
    (``C(n+1, 2m+1)``), see :func:`champ_gradeable`: 228 of the 270 v0 problems remain.

    Args:
        instruction: Appended to each problem after a space; may be empty.
        categories: Keep only these categories (exact names); None keeps all.
        gradeable_only: Drop problems ``math_reward`` cannot grade.
        version: A dataset version shipped with ``champ-dataset`` (``"v0"``), or a JSON file path.

    Raises:
        ImportError: If ``champ-dataset`` is not installed.
        ValueError: If ``version`` or a category is unknown, or the filters keep no problem.
    """

    def __init__(
        self,
        instruction: str = DEFAULT_INSTRUCTION,
        categories: list[str] | None = None,
        gradeable_only: bool = True,
        version: str = "v0",
    ) -> None:
        self.instruction, self.gradeable_only, self.version = instruction, gradeable_only, version
        self.categories = None if categories is None else list(categories)
        problems = self._load()
        valid = sorted({problem.category for problem in problems.values()})
        unknown = [category for category in self.categories or [] if category not in valid]
        if unknown or self.categories == []:
            problem = f"unknown categories {unknown}" if unknown else "the list is empty"
            raise arg_error(
                self, "categories", problem, f"use a non-empty subset of {valid}, or null for all"
            )
        self._items = []
        # natural order: P_Sequence_2 before P_Sequence_10
        for problem_id in sorted(
            problems, key=lambda pid: (pid.rpartition("_")[0], pid.rpartition("_")[2].zfill(9))
        ):
            problem, answer = problems[problem_id], champ_answer(problems[problem_id].answer)
            if self.categories and problem.category not in self.categories:
                continue
            if gradeable_only and not champ_gradeable(answer):
                continue
            prompt = " ".join(part for part in (problem.text.strip(), instruction) if part)
            columns = {
                "problem_id": problem_id,
                "category": problem.category,
                "original_answer": problem.answer,
            }
            self._items.append(PromptItem(prompt=prompt, answer=answer, columns=columns))
        if not self._items:
            raise arg_error(
                self, "categories", f"no gradeable problem in {self.categories}", "add categories"
            )

    @property
    def size(self) -> int:
        """Number of problems after filtering."""
        return len(self._items)

    def name(self) -> str:
        """Returns ``"champ"``."""
        return "champ"

    def item(self, index: int) -> PromptItem:
        """Returns problem ``index`` in natural id order."""
        self._check_index(index)
        return self._items[index]

    def _load(self) -> dict[str, Any]:
        """Imports ``champ_dataset`` lazily and returns its problems by id."""
        try:
            import champ_dataset
        except ImportError as error:
            raise ImportError(
                "ChampSource needs champ-dataset: pip install champ-dataset (or the `offline` "
                "extra)"
            ) from error
        try:
            return champ_dataset.load(self.version).problems
        except FileNotFoundError:
            shipped = sorted(
                path.stem
                for path in Path(champ_dataset.__file__).parent.glob("dataset_files/*.json")
            )
            raise arg_error(
                self, "version", f"no CHAMP version {self.version!r}", f"use one of {shipped}"
            ) from None
