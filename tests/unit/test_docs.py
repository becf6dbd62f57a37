"""The docs' figures stay tied to their result files, and no figure hides in the code.

- every file in tests/bench/results is cited by the README or a docs page, and every result
  file a page names exists;
- no benchmark figure in the product's code (a speed-up, tokens per second, milliseconds a
  request): those live on docs/performance.md, next to their command and result file.
"""
from __future__ import annotations

import re

from tests.conftest import REPO

RESULTS = REPO / "tests" / "bench" / "results"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RESULT_NAME = re.compile(r"\b((?:cpu|h100|h200)(?:x[0-9])?-[\w.-]*\.(?:json|txt))\b")
FIGURE = re.compile(r"[0-9]+(\.[0-9]+)?x|tok/s|ms a ")
STATUS_CLASS = re.compile(r"\b[45]xx\b")  # "a 4xx", "a 5xx": status classes, not figures


def pages_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


def test_every_result_file_is_cited_and_every_cited_file_exists():
    text = pages_text()
    stored = {path.name for path in RESULTS.iterdir() if path.is_file()}
    assert stored, "no result files found"
    uncited = sorted(name for name in stored if name not in text)
    assert not uncited, f"result files no page cites: {uncited}"
    missing = sorted(set(RESULT_NAME.findall(text)) - stored)
    assert not missing, f"pages cite result files that do not exist: {missing}"


def test_no_benchmark_figure_in_the_code():
    found = []
    for folder in ("preprocess", "shim", "model_repository"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix not in {".py", ".pbtxt", ".sh"}:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if FIGURE.search(STATUS_CLASS.sub("", line)):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
