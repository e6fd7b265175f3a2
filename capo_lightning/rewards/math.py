r"""Math rewards: extract the final answer, grade it against the gold answer, report verifier
health.

For one completion: :func:`~capo_lightning.rewards.extract.extract_answer` takes the last
``\boxed{}`` (else an "answer is X" phrase, else the last number);
:func:`~capo_lightning.rewards.grading.quick_verdict` settles identical strings and plain numbers
exactly in this process; everything else goes to ``math_verify`` in a
:class:`~capo_lightning.rewards.verifier.GradingPool`, under a hard wall-clock timeout that works
in any thread and in DataLoader workers. Timeouts grade 0.

Reward functions share one signature (:data:`~capo_lightning.rewards.base.RewardFn`) and never
raise on bad text; :class:`MathReward` also reports verifier health through ``pop_stats()``, which
the RolloutDataModule logs with each batch (``verifier/*``).

Differs from the paper's code on purpose: a gold answer that cannot be parsed is not a reward of
1.0 for every completion (there it zeroes the group's advantage silently). Here it is compared by
exact string/number only, counted in ``verifier/parse_fail_gold`` and logged once per answer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from capo_lightning import keys
from capo_lightning.rewards.base import check_lengths
from capo_lightning.rewards.extract import TAIL_CHARS, extract_answer, last_boxed
from capo_lightning.rewards.grading import as_number, normalize, quick_verdict
from capo_lightning.rewards.verifier import GradingPool, Outcome

__all__ = ["Grade", "MathReward", "answer_key", "math_reward"]

log = logging.getLogger(__name__)

ALL_ZERO_WARN_EVERY = 50
"""An all-zero batch with boxed answers is warned about on its 1st, 51st, 101st, ... occurrence."""


@dataclass(frozen=True)
class Grade:
    """How one completion was graded.

    Attributes:
        reward: 1.0 or 0.0; NaN when the grading process died on it (status ``error``).
        pred: the extracted answer, or None.
        status: ``ok``; ``no_answer`` (nothing extracted); ``pred_unparsed`` / ``gold_unparsed``
            (math_verify could not parse that side); ``timeout``; ``error``.
        seconds: grading wall time, extraction included.
    """

    reward: float
    pred: str | None
    status: str
    seconds: float


class MathReward:
    """The default reward: 1.0 when the completion's final answer equals the gold answer, else 0.0;
    NaN (ungraded) when the grading process died comparing it.

    Args:
        timeout_s: hard wall-clock limit per symbolic comparison; longer ones grade 0 (``timeout``).
        workers: grading processes (each about 150 MB).
        warn_all_zero: warn when a whole call scores 0 although completions contain ``\\boxed{}``
            answers: the signature of a broken grader, not of a weak policy, once it persists.
    """

    __name__ = "math_reward"

    def __init__(
        self, timeout_s: float = 5.0, workers: int = 2, warn_all_zero: bool = True
    ) -> None:
        self.pool = GradingPool(workers=workers, timeout_s=timeout_s)
        self.warn_all_zero = warn_all_zero
        self._lock = threading.Lock()
        self._grades: list[Grade] = []
        self._all_zero_calls = 0
        self._bad_golds: set[str] = set()

    @property
    def timeout_s(self) -> float:
        """The pool's limit per symbolic comparison."""
        return self.pool.timeout_s

    @property
    def workers(self) -> int:
        """The pool's number of grading processes."""
        return self.pool.workers

    def __call__(self, completions: list[str], answers: list[str], **columns: Any) -> list[float]:
        """One reward per completion, in order. ``columns`` are accepted and ignored."""
        return [grade.reward for grade in self.grade(completions, answers)]

    def grade(self, completions: list[str], answers: list[str]) -> list[Grade]:
        """Grade each completion against its gold answer and record the grades
        for :meth:`pop_stats`.

        Raises:
            ValueError: if ``completions`` and ``answers`` differ in length.
        """
        check_lengths(completions, answers)
        golds = [_gold_answer(answer) for answer in answers]
        preds, quick, seconds = [], [], []
        for completion, gold in zip(completions, golds):
            start = time.perf_counter()
            pred = _safe_extract(completion)
            preds.append(pred)
            quick.append(None if pred is None else quick_verdict(pred, gold))
            seconds.append(time.perf_counter() - start)
        todo = sorted(
            {(p, g) for p, g, q in zip(preds, golds, quick) if q is None and p is not None}
        )
        symbolic: dict[tuple[str, str], Outcome] = dict(zip(todo, self.pool.compare(todo)))
        self._report_golds(symbolic)
        grades = []
        for pred, gold, verdict, sec in zip(preds, golds, quick, seconds):
            if pred is None:
                grades.append(Grade(0.0, None, "no_answer", sec))
            elif verdict is not None:
                grades.append(Grade(float(verdict), pred, "ok", sec))
            else:
                outcome = symbolic[(pred, gold)]
                # the grader died on it: no verdict, not a 0 (a correct answer scored 0 would
                # be taught as wrong); the rollout drops its group (rollout/ungraded_groups)
                value = math.nan if outcome.status == "error" else float(outcome.equal)
                grades.append(Grade(value, pred, outcome.status, sec + outcome.seconds))
        self._record(grades, completions)
        return grades

    def _report_golds(self, symbolic: dict[tuple[str, str], Outcome]) -> None:
        """Log each gold answer math_verify cannot parse, once per MathReward."""
        for (_, gold), outcome in symbolic.items():
            if outcome.status == "gold_unparsed" and gold not in self._bad_golds:
                self._bad_golds.add(gold)
                log.warning(
                    f"capo: gold answer {gold[:200]!r} cannot be parsed; only exact matches score 1"
                )

    def _record(self, grades: list[Grade], completions: list[str]) -> None:
        with self._lock:
            self._grades.extend(grades)
        boxed = [
            g
            for g, c in zip(grades, completions)
            if g.pred is not None and "\\boxed" in str(c)[-TAIL_CHARS:]
        ]
        if not self.warn_all_zero or not boxed or any(g.reward > 0 for g in grades):
            return
        self._all_zero_calls += 1
        if (self._all_zero_calls - 1) % ALL_ZERO_WARN_EVERY == 0:
            log.warning(
                f"capo: all {len(grades)} completions scored 0 although {len(boxed)} contain a "
                f"\\boxed{{}} answer (e.g. {boxed[0].pred[:80]!r}, status {boxed[0].status}); "
                f"occurrence {self._all_zero_calls}. If the answers look right, the grader is "
                "failing: see the verifier/* metrics"
            )

    def pop_stats(self) -> dict[str, float]:
        """Verifier health since the last call, then reset. Fractions are over graded completions.

        Keys: ``verifier/parse_fail_pred`` (no answer extracted, or math_verify could not parse it),
        ``verifier/parse_fail_gold``, ``verifier/timeouts`` (count), ``verifier/errors`` (count),
        ``verifier/latency_ms_p95``, ``verifier/latency_ms_max``.
        """
        with self._lock:
            grades, self._grades = self._grades, []
        if not grades:
            return {}
        statuses = [g.status for g in grades]
        latency = torch.tensor([g.seconds * 1000 for g in grades], dtype=torch.float64)
        return {
            keys.VERIFIER_PARSE_FAIL_PRED: sum(
                s in ("no_answer", "pred_unparsed") for s in statuses
            )
            / len(grades),
            keys.VERIFIER_PARSE_FAIL_GOLD: statuses.count("gold_unparsed") / len(grades),
            keys.VERIFIER_TIMEOUTS: float(statuses.count("timeout")),
            keys.VERIFIER_ERRORS: float(statuses.count("error")),
            keys.VERIFIER_LATENCY_P95: float(torch.quantile(latency, 0.95)),
            keys.VERIFIER_LATENCY_MAX: float(latency.max()),
        }

    def close(self) -> None:
        """Stop the grading processes (they restart on the next call)."""
        self.pool.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings only: processes, locks and caches are rebuilt on the other side."""
        return {
            "timeout_s": self.timeout_s,
            "workers": self.workers,
            "warn_all_zero": self.warn_all_zero,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


math_reward = MathReward()
"""The shared default :class:`MathReward` (5 s timeout, 2 grading processes, started on first
use)."""


def answer_key(completion: str) -> str | None:
    """A canonical string for the completion's final answer, for majority voting (None: no answer).

    Plain numbers map to their exact value (``0.50``, ``1/2`` and ``\\frac{1}{2}`` share a key);
    other answers to their normalised text, so symbolically equal but differently written answers
    may vote apart.
    """
    pred = _safe_extract(completion)
    if pred is None:
        return None
    text = normalize(pred)
    number = as_number(text)
    return str(number) if number is not None else text


def _safe_extract(completion: Any) -> str | None:
    try:
        return extract_answer(str(completion))
    except Exception:  # noqa: BLE001 - a grader must never crash the training loop
        return None


def _gold_answer(answer: Any) -> str:
    r"""The gold string to compare against: the last box if the gold has one."""
    text = str(answer)
    boxed = last_boxed(text)
    return boxed if boxed else text
