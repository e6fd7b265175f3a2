"""docs/architecture.md stays a true map of the code: every file it names exists (unless marked planned),
and every file of the package is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
ROOTS = ("capo_lightning/", "conf/", "tests/", "benchmarks/", "scripts/", "sweeps/", "docs/", ".ci/")


def named_paths(text: str) -> list[tuple[str, bool]]:
    """(path, planned) for every backticked repository path outside code blocks."""
    found = []
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for line in prose.splitlines():
        for span in re.findall(r"`([^`\s]+)`", line):
            if span.startswith(ROOTS) and re.fullmatch(r"[\w./-]+", span):
                found.append((span, "(planned)" in line))
    return found


def test_every_named_file_exists() -> None:
    named = named_paths(DOC.read_text())
    assert len(named) > 50
    missing = [path for path, planned in named if not planned and not (ROOT / path).exists()]
    assert missing == []
    # and what is marked planned really is not built yet (or the mark is stale)
    built = [path for path, planned in named if planned and (ROOT / path).exists()]
    assert built == []


def test_every_package_file_is_named() -> None:
    named = {path for path, _ in named_paths(DOC.read_text())}
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "capo_lightning").rglob("*.py"))
    assert len(files) > 40
    assert [f for f in files if f not in named] == []


def test_the_checks_can_fail() -> None:
    text = (
        "| `capo_lightning/nope.py` | gone |\n| `capo_lightning/later.py` | **(planned)** x |\n```\n`conf/x.yaml`\n```"
    )
    assert named_paths(text) == [("capo_lightning/nope.py", False), ("capo_lightning/later.py", True)]
