"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one namespace (a later block may use an earlier block's
names), in a temporary working directory (so files they save land there). Long runs are shortened
only through RESONANT_DOCS_QUICK=1, which this test sets and which the README documents: a block
reads it where a full-size run would take minutes, e.g.
`episodes = 30 if os.environ.get("RESONANT_DOCS_QUICK") else 1500`.
A block that needs an optional extra that is not installed is skipped, naming the extra.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from resonant.extras import EXTRA_OF

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block, in order."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_block_extraction_finds_fenced_python_only():
    text = "intro\n```python\na = 1\n```\n```bash\nmake\n```\n```\nplain\n```\n```python\nb = a\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (12, "b = a\n")]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_python_blocks_run_in_order(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text())
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESONANT_DOCS_QUICK", "1")
    namespace: dict = {"__name__": "__docs__"}
    for line, code in blocks:
        try:
            # padded to its line in the file, so a traceback points at the README/docs line itself
            exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
        except ModuleNotFoundError as exc:
            extra = EXTRA_OF.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            pytest.skip(f"{path.name} line {line} needs the `{extra}` extra ({exc.name} is not installed)")
