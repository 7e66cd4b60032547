"""The README's SpatialMemory / tree-world code block runs as written."""
import re
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## SpatialMemory and the tree world"


def section_blocks():
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_readme_tree_world_block_runs(tmp_path, monkeypatch):
    blocks = section_blocks()
    assert blocks, "the section has no python block"
    monkeypatch.chdir(tmp_path)  # the block saves memory.pt in the working directory
    for block in blocks:
        scope = {}
        exec(compile(block, str(README), "exec"), scope)
    assert scope["z"].shape == (2, 384) and scope["where"].shape == (16, 2)
    assert len(scope["losses"]) == 100 and (tmp_path / "memory.pt").exists()
