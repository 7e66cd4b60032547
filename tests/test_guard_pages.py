"""Every C++ kernel, forward and backward, with each buffer ending (or starting) at an unreadable
page: see tests/guard_pages.py. Each group runs in a child process, so an out-of-bounds access
fails the test with the case that crashed instead of killing the test session."""
import subprocess
import sys
from pathlib import Path

import pytest

from backends import requires

RUNNER = Path(__file__).with_name("guard_pages.py")


@requires("cpu")
@pytest.mark.parametrize("group", ["read", "loo", "sample", "blocked"])
def test_kernels_stay_inside_their_buffers(group):
    run = subprocess.run([sys.executable, str(RUNNER), group], capture_output=True, text=True, timeout=600)
    last = run.stdout.strip().splitlines()[-1:] or ["<nothing printed>"]
    assert run.returncode == 0, (
        f"guard-page run '{group}' ended with code {run.returncode} (negative: killed by that signal) "
        f"during: {last[0]}\n{run.stderr[-2000:]}"
    )
    assert last[0].startswith("ok:"), last[0]
