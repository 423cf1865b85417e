"""The repository speaks of the project as it is: no development history, no talk of how the work
was organised, no dates. git log keeps the history; docstrings say what code does and why.

Scans the text files the repository ships (README, docs, benchmarks and their results, results
pages, code, tests, presets, Docker files) for phrases that only a history or a lab diary uses.
This file is left out: it has to spell them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["README.md", "pyproject.toml", "docs", "bench", "results", "deca_flower", "apps", "tests", "conf", "docker"]
TEXT_SUFFIXES = {".md", ".py", ".sh", ".yaml", ".yml", ".toml", ".txt", ""}  # "": Dockerfile
SKIPPED_DIRS = {".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "nodes", "previous"}
USER_RUNS = ROOT / "results" / "runs"  # a user's own runs (git-ignored), not the repository's

HISTORY = {
    "a work session": r"\bsessions?\b(?!\s+keys?\b)",  # no legitimate use here but a session key
    "a date": r"\b20\d\d-(0[1-9]|1[0-2])\b",
    "earlier version": r"\bearlier (version|code|runs? of the code)\b",
    "used to": r"\bused to (be|do|send|keep|take|run|read|make)\b",
    "was fixed": r"\b(was|were|got|is now|are now) fixed\b",
    "previously": r"\bpreviously\b",
    "before/after a change": r"\b(before|after) (this|that|the|a) (change|fix|patch|rewrite|refactor)\b",
    "the old code": r"\bthe old (code|version|path|fold)\b",
    "no longer does": r"\bno longer (sends|keeps|copies|needs|uses|runs|does)\b",
    "a machine being lent": r"\b(lent|lend|lends|lending)\b|\bnot[_ ]drawn\b",
    "scratch probes": r"\bscratch (probes?|driver|timers|run)\b|\bnot committed\b",
}
PATTERN = re.compile("|".join(f"(?P<p{i}>{rx})" for i, rx in enumerate(HISTORY.values())), re.IGNORECASE)
NAMES = list(HISTORY)


def shipped_text_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        path = ROOT / entry
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in candidates:
            parts = set(file.relative_to(ROOT).parts[:-1])
            if (file.suffix in TEXT_SUFFIXES and not parts & SKIPPED_DIRS and USER_RUNS not in file.parents
                    and file.resolve() != Path(__file__).resolve()):
                files.append(file)
    return files


def history_in(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind of phrase, the line) for every match."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in PATTERN.finditer(line):
            kind = NAMES[int(next(k for k, v in match.groupdict().items() if v is not None)[1:])]
            hits.append((number, kind, line.strip()[:160]))
    return hits


SESSION = "sess" + "ion"  # spelled apart so that other greps of the repository do not stop here


@pytest.mark.parametrize(("text", "kind"), [
    (f"Measured in {SESSION} 12 on the old code.", "a work session"),
    (f"{SESSION.title()}s 1-10 got the same accuracies.", "a work session"),
    ("so it cannot rot between the sessions that have a GPU", "a work session"),
    ("rerun on 2026-11-30", "a date"),
    ("GPU: none lent to this session", "a machine being lent"),
    ("the payload, as until the earlier version", "earlier version"),
    ("FedAvg previously sent the head twice", "previously"),
    ("7,454 MiB before the fix", "before/after a change"),
])
def test_the_patterns_catch_history(text, kind):
    assert kind in [k for _, k, _ in history_in(text)]


@pytest.mark.parametrize("text", [
    "a node that goes silent is dropped",  # "lent" inside a word
    "the old first moment, weighted by b1",  # "the old" of a moment, not of code
    "a session key per neighbour pair",
    "the model is used to score each label",
    "arXiv 2606.03209",
])
def test_the_patterns_leave_ordinary_words(text):
    assert history_in(text) == []


def test_no_history_in_the_repository():
    files = shipped_text_files()
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files)
    found = [f"{file.relative_to(ROOT)}:{number}: {kind}: {line}"
             for file in files for number, kind, line in history_in(file.read_text(errors="replace"))]
    assert not found, "history in the repository (git log keeps it):\n" + "\n".join(found)
