"""A copy of this checkout in a temporary folder, as a clean clone (plus its build) would have it.

Shared by the tests that build the package from its sources or run `make` targets without
touching the working tree.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def have_git_checkout() -> bool:
    return shutil.which("git") is not None and (ROOT / ".git").exists()


def checkout_files() -> list[str]:
    """The files a clone of this checkout would have (tracked and untracked, not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def copy_checkout(dst: Path, *, skip: tuple[str, ...] = (), with_build: bool = False, commit: bool = False) -> Path:
    """Copies the checkout's files (those under a `skip` prefix left out) into dst. with_build adds
    the compiled extensions (ignored build outputs); commit makes dst a git repository whose
    working tree is clean, so `git status` there shows whatever a command writes."""
    files = [f for f in checkout_files() if not f.startswith(skip)]
    if with_build:
        files += [str(p.relative_to(ROOT)) for p in (ROOT / "resonant_kernels").glob("_C*.so")]
        files += [f for f in ("resonant_kernels/_build_info.json",) if (ROOT / f).exists()]
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    if commit:
        git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
            subprocess.run([*git, *args], cwd=dst, check=True, capture_output=True)
    return dst


def git_status(path: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=path, capture_output=True,
                          text=True, check=True).stdout
