r"""Math grading throughput: completions graded per second, in-process vs MathReward's grading pool.

Run from the repository root (CPU only, no network, no model)::

    .venv/bin/python benchmarks/grading_throughput.py                      # all workloads, workers 1,2,4
    .venv/bin/python benchmarks/grading_throughput.py --workload training --workers 2 --repeats 5

Arms, all timed on the SAME generated completions in one run, interleaved (for each repeat: every arm
in turn on that repeat's workload):

``in-process`` (the baseline)
    For each completion, in this process: ``extract_answer`` then ``grading.is_equivalent`` (exact fast
    path, else math_verify/sympy), one completion after another, with no pool, no timeout and no
    de-duplication. This is what a naive single-process reward function costs.
``MathReward(workers=N)`` (one arm per ``--workers`` entry, default 1,2,4)
    ``MathReward.grade`` (what ``MathReward.__call__`` runs): extraction and ``quick_verdict`` in this
    process, then every distinct (pred, gold) pair the fast path cannot settle goes to a GradingPool of N
    subprocesses under a hard timeout (``--timeout``, library default 5 s), plus one parse check per
    gold answer the reward has not seen before (cached). The pools are started (``pool.start()``, which
    imports sympy in each server) before any timing; that start-up time is reported separately, as is
    the baseline's (importing math_verify and the same one warm-up comparison the servers make).

Workloads (``--workload``, default all), generated from templates with a seeded ``random.Random``:

``numeric``: GSM8K-like. Integer golds; boxed answers written as ``1234``, ``1,234``, ``1{,}234``,
    ``\$1,234``, ``1234.00``, some ``The answer is ...`` or ``#### 1234`` without a box, ~70% correct.
    About 10% carry units or ``x = ...`` (``\boxed{1234 \text{ apples}}``; the fast path strips those)
    and about 10% are left as arithmetic (``\boxed{1230 + 4}``, ``\boxed{2468 \div 2}``), which only
    sympy decides: ~90% take the exact fast path.
``symbolic``: MATH-like. Fractions, ``\sqrt``, ``\pi``, complex numbers, intervals, sets, tuples,
    equations and polynomials (``x^2+6x+9`` vs ``(x+3)^2``), ~50% correct, every answer written
    differently from its gold so that the fast path cannot decide it and sympy must.
``training``: a realistic rollout batch of 96 completions = 12 prompts x 8 samples, half numeric and
    half symbolic prompts. Each prompt has a difficulty (P(correct) uniform in [0.1, 0.9]); its samples
    draw from one or two writings of the correct answer and two wrong answers, so answers repeat
    within a group and MathReward's de-duplication matters; 5% have no box. Every completion has about
    850 characters of reasoning before its final answer (~320 tokens in all with SmolLM2's tokenizer,
    which splits this digit-heavy text at ~2.8 characters per token); numeric and symbolic ones ~300
    characters.

numeric and symbolic completions are graded in calls of ``--batch`` (default 96, one training batch)
completions; training in calls of its 96-completion batches. ``--size`` sets the completions per
workload and repeat (default: numeric 3840, symbolic 384, training 768 = 8 batches; training is rounded
up to whole batches). Every repeat gets a fresh workload (seed + repeat), identical for all arms, because
sympy caches results per process: grading the same strings again is 10-100x faster and would flatter
whichever arm ran them before. Before the timed repeats each arm grades one untimed warm-up batch of
every selected workload (another seed), so lazy first-use costs inside sympy are not timed.

Reported per workload and arm: the best (fastest) of ``--repeats`` repeats (default 3) as completions
per second and its ratio to the baseline's best; p50/p95 per-completion latency of that repeat (baseline:
measured around each completion; MathReward: ``Grade.seconds``, i.e. extraction plus the comparison's
wall time inside the grading child, without queueing and pipe transfers; one shared comparison for
de-duplicated pairs; p95 is ``pop_stats()["verifier/latency_ms_p95"]``), and the CPU time the calling
(training) process spent per completion (the pool does its sympy work in other processes).

Cross-check: for every completion of every repeat, each MathReward arm's reward must equal the
baseline's (an AssertionError lists the mismatches). The default run takes about 1.5 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `capo_lightning`

from capo_lightning.rewards.extract import extract_answer  # noqa: E402
from capo_lightning.rewards.grading import as_number, is_equivalent, normalize, quick_verdict, symbolic_verdict  # noqa: E402
from capo_lightning.rewards.math import MathReward  # noqa: E402

for _name in ("math_verify", "latex2sympy2_extended"):  # the grading servers silence these too
    logging.getLogger(_name).setLevel(logging.ERROR)

BATCH_PROMPTS, BATCH_SAMPLES = 12, 8
DEFAULT_SIZE = {"numeric": 3840, "symbolic": 384, "training": 768}
WORKLOADS = tuple(DEFAULT_SIZE)
HEADER = f"  {'arm':22s} {'compl/s':>9s} {'x in-proc':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'caller CPU ms/compl':>19s}"


# ================================================================================================
# Workload generation
# ================================================================================================
@dataclass
class Workload:
    """Completions and gold answers, split into the calls one reward invocation grades."""

    name: str
    calls: list[tuple[list[str], list[str]]] = field(default_factory=list)

    @property
    def completions(self) -> list[str]:
        return [c for completions, _ in self.calls for c in completions]

    @property
    def answers(self) -> list[str]:
        return [a for _, answers in self.calls for a in answers]


_NOUNS = ("apples", "marbles", "tickets", "students", "pages", "dollars", "cookies", "miles", "boxes", "coins")
_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")


def _sentence(rng: random.Random) -> str:
    """One sentence of step-by-step reasoning with a little arithmetic or algebra in it."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    noun, name = rng.choice(_NOUNS), rng.choice(_NAMES)
    return rng.choice(
        (
            f"First, {name} has {a} {noun} and gets {b} more, so that is ${a} + {b} = {a + b}$ {noun}.",
            f"Multiplying, we get ${a} \\times {b} = {a * b}$, which we will need below.",
            f"Let $x$ be the number of {noun} {name} keeps; then $x + {a} = {a + b}$, so $x = {b}$.",
            f"We can check this: ${a * b} \\div {b} = {a}$, as expected.",
            f"Note that $({a} - {b})^2 = {(a - b) ** 2}$ is never negative, so the bound holds.",
            f"Substituting $y = {a}$ into the equation gives ${b}y = {a * b}$.",
            f"So far, {name} has spent {a} minutes, and the remaining part takes {b} minutes.",
            "Now let's simplify the expression step by step, keeping track of the signs.",
            f"Since the ratio is $\\frac{{{a}}}{{{b}}}$, we scale both sides by {b}.",
            "Wait, let me double-check the previous step before going on.",
            f"The difference is ${max(a, b)} - {min(a, b)} = {abs(a - b)}$.",
        )
    )


def _reasoning(rng: random.Random, chars: int) -> str:
    """Filler reasoning of about ``chars`` characters (~2.8 characters per SmolLM2 token)."""
    parts, length = [], 0
    while length < chars:
        parts.append(_sentence(rng))
        length += len(parts[-1]) + 1
    return " ".join(parts)


def _thousands(n: int) -> str:
    return f"{n:,}"


def _numeric_item(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A GSM8K-like gold integer, writings of it, and writings of wrong answers (final-answer text)."""
    gold = rng.choice((rng.randint(2, 200), rng.randint(200, 5000), rng.randint(5000, 250_000)))

    def writings(n: int) -> list[str]:
        boxed = [f"\\boxed{{{n}}}"] * 4 + [f"\\boxed{{{n}.00}}", f"\\boxed{{\\${_thousands(n)}}}"]
        if n >= 1000:
            boxed += [f"\\boxed{{{_thousands(n)}}}"] * 2 + [f"\\boxed{{{_thousands(n).replace(',', '{,}')}}}"]
        return boxed + [f"The answer is {n}.", f"#### {n}"]

    def unevaluated(n: int) -> str:  # left as arithmetic: only sympy can decide it
        k = rng.randint(2, 9)
        return rng.choice(
            (f"\\boxed{{{n - k} + {k}}}", f"\\boxed{{{n * k} \\div {k}}}", f"\\boxed{{{k} \\times {n}/{k}}}")
        )

    def write(n: int) -> str:  # ~10% unevaluated, ~10% with units or "x = ..." (the fast path strips those)
        u = rng.random()
        if u < 0.1:
            return unevaluated(n)
        if u < 0.2:
            return rng.choice((f"\\boxed{{{n} \\text{{ {rng.choice(_NOUNS)}}}}}", f"\\boxed{{x = {n}}}"))
        return rng.choice(writings(n))

    wrong = rng.choice((gold + rng.randint(1, 9), gold - rng.randint(1, 9), gold * 10, max(1, gold // 2)))
    right_forms, wrong_forms = [write(gold) for _ in range(2)], [write(wrong) for _ in range(2)]
    return str(gold), right_forms, wrong_forms


def _squarefree(rng: random.Random) -> int:
    return rng.choice((2, 3, 5, 6, 7, 10, 11, 13))


def _symbolic_item(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A MATH-like gold answer, equal writings that differ from it, and wrong answers (box contents)."""
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    s = _squarefree(rng)
    kind = rng.randrange(12)
    if kind == 0:  # rationalised denominator
        a = a if math.gcd(a, s) == 1 else 1
        gold = f"\\frac{{{a}\\sqrt{{{s}}}}}{{{s}}}"
        right = [f"\\frac{{{a}}}{{\\sqrt{{{s}}}}}", f"{a}/\\sqrt{{{s}}}"]
        wrong = [f"\\frac{{{a}}}{{{s}}}", f"\\frac{{{a + 1}}}{{\\sqrt{{{s}}}}}"]
    elif kind == 1:  # simplified radical
        gold = f"{a}\\sqrt{{{s}}}"
        right = [f"\\sqrt{{{a * a * s}}}", f"\\sqrt{{{s}}} \\cdot {a}"]
        wrong = [f"\\sqrt{{{a * a * s + 1}}}", f"{a + 1}\\sqrt{{{s}}}"]
    elif kind == 2:  # multiple of pi
        gold = f"{a}\\pi"
        right = [f"\\pi \\cdot {a}", f"{a} \\pi"]
        wrong = [f"{a + 1}\\pi", f"\\frac{{{a}\\pi}}{{2}}"]
    elif kind == 3:  # fraction of pi
        f = Fraction(a, a + b)
        gold = f"\\frac{{{f.numerator}\\pi}}{{{f.denominator}}}"
        right = [f"\\frac{{{f.numerator}}}{{{f.denominator}}}\\pi", f"{f.numerator}\\pi/{f.denominator}"]
        wrong = [
            f"\\frac{{{f.numerator}\\pi}}{{{f.denominator + 1}}}",
            f"\\frac{{{f.denominator}}}{{{f.numerator}}}\\pi",
        ]
    elif kind == 4:  # a + b sqrt(s)
        gold = f"{a}+{b}\\sqrt{{{s}}}"
        right = [f"{b}\\sqrt{{{s}}}+{a}", f"{a} + \\sqrt{{{b * b * s}}}"]
        wrong = [f"{a}-{b}\\sqrt{{{s}}}", f"{a + 1}+{b}\\sqrt{{{s}}}"]
    elif kind == 5:  # complex number
        gold = f"{a}+{b}i"
        right = [f"{b}i+{a}", f"{a} + {b}i"]
        wrong = [f"{a}-{b}i", f"{a}+{b + 1}i"]
    elif kind == 6:  # interval
        lo, hi = -a, b + c
        gold = rng.choice((f"({lo}, {hi}]", f"[{lo}, \\infty)"))
        right = [gold.replace(" ", ""), gold.replace(", ", ",\\ ")]
        flipped = f"[{lo},{hi})" if gold.startswith("(") else f"({lo},\\infty)"
        wrong = [flipped, gold.replace(f"{lo}", f"{lo - 1}")]
    elif kind == 7:  # set
        items = sorted(rng.sample(range(-5, 12), 3))
        gold = "\\{" + ", ".join(map(str, items)) + "\\}"
        shuffled = items[:]
        rng.shuffle(shuffled)
        right = ["\\{" + ",".join(map(str, shuffled)) + "\\}", "\\{" + ",".join(map(str, reversed(items))) + "\\}"]
        wrong = [
            "\\{" + ",".join(map(str, items[:2] + [items[2] + 1])) + "\\}",
            "\\{" + ",".join(map(str, items[:2])) + "\\}",
        ]
    elif kind == 8:  # ordered pair
        x, y = a, -b
        gold = f"({x}, {y})"
        right = [f"({x},{y})", f"\\left( {x}, {y} \\right)"]
        wrong = [f"({y},{x})", f"({x},{-y})"]
    elif kind == 9:  # line equation
        gold = f"y = {a}x - {c}"
        right = [f"y=-{c}+{a}x", f"y = {a}x + (-{c})"]
        wrong = [f"y={a}x+{c}", f"y={a + 1}x-{c}"]
    elif kind == 10:  # perfect square
        gold = f"(x+{a})^2"
        right = [f"x^2+{2 * a}x+{a * a}", f"x^2 + {a * a} + {2 * a}x"]
        wrong = [f"x^2+{a}x+{a * a}", f"x^2+{a * a}"]
    else:  # factored quadratic
        gold = f"(x+{a})(x-{b})"
        lin = a - b
        right = [f"x^2{lin:+d}x-{a * b}" if lin else f"x^2-{a * b}", f"(x-{b})(x+{a})"]
        wrong = [f"x^2{-lin:+d}x-{a * b}" if lin else f"x^2+{a * b}", f"(x-{a})(x-{b})"]
    return gold, [f"\\boxed{{{r}}}" for r in right], [f"\\boxed{{{w}}}" for w in wrong]


def _completion(rng: random.Random, final: str, reasoning_chars: int) -> str:
    lead = rng.choice(("Therefore, the final answer is ", "So the answer is ", "Thus we get ", "Hence "))
    tail = final if not final.startswith("\\boxed") else f"{lead}${final}$."
    return f"{_reasoning(rng, reasoning_chars)}\n\n{tail}"


def make_workload(name: str, size: int, batch: int, seed: int) -> Workload:
    """Generate ``size`` completions of workload ``name`` deterministically from ``seed``."""
    rng = random.Random(f"{name}-{seed}")
    work = Workload(name)
    if name in ("numeric", "symbolic"):
        item, p_correct, chars = (_numeric_item, 0.7, 300) if name == "numeric" else (_symbolic_item, 0.5, 300)
        completions, answers = [], []
        for _ in range(size):
            gold, right, wrong = item(rng)
            final = rng.choice(right if rng.random() < p_correct else wrong)
            completions.append(_completion(rng, final, chars))
            answers.append(gold)
        work.calls = [(completions[i : i + batch], answers[i : i + batch]) for i in range(0, size, batch)]
        return work
    per_batch = BATCH_PROMPTS * BATCH_SAMPLES
    for _ in range(-(-size // per_batch)):
        completions, answers = [], []
        for _ in range(BATCH_PROMPTS):
            gold, right, wrong = (_numeric_item if rng.random() < 0.5 else _symbolic_item)(rng)
            p_correct = rng.uniform(0.1, 0.9)
            right = right[:1] if rng.random() < 0.5 else right  # one or two writings of the correct answer
            for _ in range(BATCH_SAMPLES):
                u = rng.random()
                if u < 0.05:  # ran out of tokens mid-reasoning: no box
                    completions.append(_reasoning(rng, 850).rsplit(" ", 3)[0])
                else:
                    final = rng.choices(right, (0.8, 0.2)[: len(right)])[0] if u < 0.05 + 0.95 * p_correct else None
                    final = final or rng.choices(wrong, (0.7, 0.3))[0]
                    completions.append(_completion(rng, final, 850))
                answers.append(gold)
        work.calls.append((completions, answers))
    return work


def describe(work: Workload) -> dict[str, float]:
    """How much of ``work`` needs sympy: completions, distinct pairs per call (summed), and gold answers.

    ``golds`` counts the distinct non-numeric gold answers that have a completion needing sympy: MathReward
    parse-checks each once (one extra sympy comparison, ``(gold, gold)``, in the pool) before its first use.
    """
    symbolic = unique = 0
    golds = set()
    for completions, answers in work.calls:
        todo = set()
        for completion, gold in zip(completions, answers):
            pred = extract_answer(completion)
            if pred is not None and quick_verdict(pred, gold) is None:
                symbolic += 1
                todo.add((pred, gold))
                golds.update([gold] if as_number(normalize(gold)) is None else [])
        unique += len(todo)
    n = len(work.completions)
    chars = statistics.mean(len(c) for c in work.completions)
    return {
        "n": n,
        "symbolic": symbolic / n,
        "unique": unique,
        "symbolic_n": symbolic,
        "chars": chars,
        "golds": len(golds),
    }


# ================================================================================================
# Arms
# ================================================================================================
def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (torch.quantile's default, as in MathReward.pop_stats)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Run:
    """One timed pass of one arm over one workload."""

    wall: float
    cpu: float
    rewards: list[float]
    p50_ms: float
    p95_ms: float
    statuses: list[str] = field(default_factory=list)


def run_baseline(work: Workload) -> Run:
    """extract_answer + is_equivalent per completion, in this process, no pool/timeout/dedup."""
    rewards, latency = [], []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for completions, answers in work.calls:
        for completion, gold in zip(completions, answers):
            start = time.perf_counter()
            pred = extract_answer(completion)
            rewards.append(float(pred is not None and is_equivalent(pred, gold)))
            latency.append(time.perf_counter() - start)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ms = [x * 1000 for x in latency]
    return Run(wall, cpu, rewards, _quantile(ms, 0.5), _quantile(ms, 0.95))


def run_pool(reward: MathReward, work: Workload) -> Run:
    """MathReward.grade (what reward(completions, answers) runs) on each call of the workload."""
    reward.pop_stats()
    grades = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for completions, answers in work.calls:
        grades.extend(reward.grade(completions, answers))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stats = reward.pop_stats()
    ms = [g.seconds * 1000 for g in grades]
    return Run(
        wall,
        cpu,
        [g.reward for g in grades],
        _quantile(ms, 0.5),
        stats["verifier/latency_ms_p95"],
        [g.status for g in grades],
    )


def cross_check(label: str, work: Workload, baseline: Run, run: Run) -> None:
    """Every completion's reward from the pool arm must equal the in-process baseline's."""
    bad = [i for i, (x, y) in enumerate(zip(baseline.rewards, run.rewards)) if x != y]
    lines = [
        f"  #{i}: gold {work.answers[i]!r}, pred {extract_answer(work.completions[i])!r}: "
        f"in-process {baseline.rewards[i]}, {label} {run.rewards[i]} ({run.statuses[i]})"
        for i in bad[:20]
    ]
    assert len(run.rewards) == len(baseline.rewards) and not bad, (
        f"{label} disagrees with the in-process baseline on {len(bad)} of {len(baseline.rewards)} "
        f"{work.name} completions:\n" + "\n".join(lines)
    )


# ================================================================================================
# Main
# ================================================================================================
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    p.add_argument("--workers", type=str, default="1,2,4", help="comma-separated MathReward worker counts")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per arm (fresh workload each); best is reported"
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="completions per workload and repeat (default: numeric 3840, symbolic 384, training 768; "
        "training is rounded up to whole 96-completion batches)",
    )
    p.add_argument("--batch", type=int, default=96, help="completions per reward call (numeric and symbolic)")
    p.add_argument("--timeout", type=float, default=5.0, help="MathReward timeout_s per symbolic comparison")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    names = WORKLOADS if args.workload == "all" else (args.workload,)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    t_start = time.perf_counter()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, load average {load} (1/5/15 min)", flush=True)

    # Workloads: one warm-up set (seed - 1, one call each) and one fresh set per repeat, all arms share them.
    sizes = {n: args.size or DEFAULT_SIZE[n] for n in names}
    warmup = {n: make_workload(n, min(sizes[n], args.batch), args.batch, args.seed - 1) for n in names}
    repeats = [{n: make_workload(n, sizes[n], args.batch, args.seed + r) for n in names} for r in range(args.repeats)]

    # Start-up, reported apart: the baseline imports math_verify and makes the servers' warm-up comparison.
    start = time.perf_counter()
    symbolic_verdict("\\frac{1}{2}", "0.5")
    startup = {"in-process": time.perf_counter() - start}
    rewards: dict[str, MathReward] = {}
    for w in workers:
        label = f"MathReward(workers={w})"
        rewards[label] = MathReward(timeout_s=args.timeout, workers=w, warn_all_zero=False)
        start = time.perf_counter()
        rewards[label].pool.start()
        startup[label] = time.perf_counter() - start
    arms = ["in-process", *rewards]

    def run_arm(arm: str, work: Workload) -> Run:
        return run_baseline(work) if arm == "in-process" else run_pool(rewards[arm], work)

    try:
        for arm in arms:  # untimed warm-up
            for n in names:
                run_arm(arm, warmup[n])
        results: dict[str, dict[str, list[Run]]] = {n: {arm: [] for arm in arms} for n in names}
        for r, works in enumerate(repeats):
            for n in names:
                for arm in arms:
                    run = run_arm(arm, works[n])
                    if arm != "in-process":
                        cross_check(arm, works[n], results[n]["in-process"][-1], run)
                    results[n][arm].append(run)
                    print(
                        f"repeat {r + 1}/{args.repeats} {n:9s} {arm:22s} {run.wall:7.2f} s "
                        f"({len(run.rewards) / run.wall:8.1f} completions/s)",
                        flush=True,
                    )
    finally:
        for reward in rewards.values():
            reward.close()

    print(f"\n=== grading throughput: best of {args.repeats}, {os.cpu_count()} CPUs, timeout {args.timeout:g} s ===")
    print("start-up (not timed below): " + ", ".join(f"{arm} {s:.2f} s" for arm, s in startup.items()))
    for n in names:
        info = describe(repeats[0][n])
        correct = statistics.mean(results[n]["in-process"][0].rewards)
        print(
            f"\n{n}: {info['n']} completions/repeat in calls of {len(repeats[0][n].calls[0][0])}, "
            f"{info['chars']:.0f} chars each on average; {100 * info['symbolic']:.0f}% need sympy "
            f"({info['symbolic_n']} completions, {info['unique']} distinct pairs within calls, "
            f"{info['golds']} new golds); "
            f"{100 * correct:.0f}% correct"
        )
        print(HEADER)
        base = min(results[n]["in-process"], key=lambda x: x.wall)
        base_rate = len(base.rewards) / base.wall
        for arm in arms:
            best = min(results[n][arm], key=lambda x: x.wall)
            rate = len(best.rewards) / best.wall
            print(
                f"  {arm:22s} {rate:9.1f} {rate / base_rate:9.2f} {best.p50_ms:8.2f} {best.p95_ms:8.2f} "
                f"{1000 * best.cpu / len(best.rewards):19.3f}"
            )
    print(f"\ncross-check: every MathReward reward equals the in-process reward ({len(rewards)} arms x all repeats)")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"total {time.perf_counter() - t_start:.0f} s; load average now {load} (other jobs on the cores skew ratios)")


if __name__ == "__main__":
    main()
