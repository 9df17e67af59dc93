"""benchmarks/ holds results only: every file of benchmarks/data is cited by RESULTS.md or
NOTES.md (``data/NAME``, globs and ``{a,b}`` sets included), and every citation names a file."""

from __future__ import annotations

import fnmatch
import os
import re

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
DOCS = ("RESULTS.md", "NOTES.md")


def expand(pattern: str) -> list[str]:
    """``a_{x,y}.md`` -> ``a_x.md``, ``a_y.md`` (nested sets too)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in expand(pattern[: m.start()] + alt + pattern[m.end():])]


def citations() -> dict[str, str]:
    """Each pattern a doc cites under data/ -> where (a citation may wrap after ``data/``)."""
    found = {}
    for doc in DOCS:
        text = open(os.path.join(BENCHMARKS, doc)).read()
        for m in re.finditer(r"data/\s*([\w.{},*-]*[\w*}])", text):
            for pattern in expand(m.group(1)):
                found.setdefault(pattern, f"{doc}:{text[: m.start()].count(chr(10)) + 1}")
    return found


def test_benchmarks_holds_no_code():
    assert not [f for f in os.listdir(BENCHMARKS) if f.endswith((".py", ".sh"))], "code lives in sparse_prefill.bench"


def test_every_data_file_is_cited_and_every_citation_exists():
    files = os.listdir(os.path.join(BENCHMARKS, "data"))
    cited = citations()
    assert cited
    for pattern, where in cited.items():
        assert fnmatch.filter(files, pattern), f"{where} cites data/{pattern}, which matches no file"
    uncited = [f for f in files if not any(fnmatch.fnmatchcase(f, p) for p in cited)]
    assert not uncited, f"benchmarks/data files neither RESULTS.md nor NOTES.md cites: {uncited}"
