"""The README as a first-time user reads it: every Python block runs as written (CPU size), and
every file it links or names as a path exists in the repository (a clone has nothing outside)."""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each fenced ```python block of the README."""
    text = open(README).read()
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return blocks


def test_readme_has_python_blocks():
    assert python_blocks(), "the README lost its code examples"


@pytest.mark.parametrize("line, code", python_blocks(), ids=lambda x: f"line{x}" if isinstance(x, int) else "")
def test_readme_python_block_runs(line, code):
    # A fresh namespace per block: each must be complete on its own.
    exec(compile(code, f"{README}:{line}", "exec"), {"__name__": f"readme_line_{line}"})


def test_readme_links_stay_in_the_repository():
    text = open(README).read()
    targets = re.findall(r"\]\(([^)#\s]+)", text)  # markdown links and images
    targets += re.findall(r"`((?:benchmarks|sparse_prefill|tests)/[\w./-]+)`", text)  # named paths
    assert targets
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        assert not target.startswith(("..", "/")), f"README points outside the repository: {target}"
        assert os.path.exists(os.path.join(REPO, target)), f"README names {target}, which does not exist"
