"""The README's PatternMemory example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_pattern_memory_readme_example_runs():
    text = README.read_text()
    section = text[text.index("## PatternMemory"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python example in the README's PatternMemory section"
    for block in blocks:
        exec(compile(block, f"{README}:PatternMemory", "exec"), {})
