"""Runs write to ./runs/<name>/ (or --out), never into tracked files.

The `make bench` checks run in a committed copy of the checkout (with this build's compiled
extensions), so `git status` there shows exactly what the benchmarks wrote. The full `make bench`
takes minutes (slow marker, `make test-slow`); the fast check runs the same scripts, read from
`make -n bench`, at tiny sizes.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkout import ROOT, copy_checkout, git_status, have_git_checkout
from resonant.runs import run_dir, write_text_atomic

# Extra arguments that shrink each `make bench` script to seconds (the flags exist in the scripts).
TINY = {
    "benchmarks/bench_read.py": ["--Q", "64", "--M", "128", "--repeats", "1", "--no-memory", "--methods", "reference",
                                 "cpu"],
    "benchmarks/bench_prune.py": ["--sizes", "64", "--repeats", "1"],
}


def bench_commands() -> list[list[str]]:
    """The python commands of `make bench` (the install step left out), as make would run them."""
    dry = subprocess.run(["make", "-n", "bench", "PY=python", "-o", ".venv/.installed", "-o", "install"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    commands = [shlex.split(line) for line in dry.splitlines() if line.startswith("python benchmarks/")]
    assert commands, f"`make -n bench` printed no benchmark commands:\n{dry}"
    return commands


@pytest.fixture
def snapshot(tmp_path):
    if not have_git_checkout() or shutil.which("make") is None:
        pytest.skip("needs a git checkout and make")
    return copy_checkout(tmp_path / "checkout", with_build=True, commit=True)


def test_make_bench_scripts_leave_the_checkout_clean(snapshot):
    for command in bench_commands():
        script = command[1]
        assert script in TINY, f"`make bench` runs {script}: add tiny sizes for it to TINY"
        subprocess.run([sys.executable, *command[1:], *TINY[script]], cwd=snapshot, check=True, capture_output=True)
    written = sorted(p.name for p in (snapshot / "runs" / "benchmarks").glob("*.json"))
    assert written, "the benchmarks wrote nothing under runs/benchmarks"
    assert git_status(snapshot) == "", f"`make bench` scripts changed tracked files:\n{git_status(snapshot)}"
    for name in written:
        json.loads((snapshot / "runs" / "benchmarks" / name).read_text())


@pytest.mark.slow
def test_make_bench_leaves_git_status_clean(snapshot):
    """The real `make bench` (its --quick benchmarks take minutes on 2 cores)."""
    subprocess.run(["make", "bench", f"PY={sys.executable}", "-o", ".venv/.installed"], cwd=snapshot, check=True,
                   capture_output=True)
    assert git_status(snapshot) == ""


def test_train_writes_under_runs_name_by_default(tmp_path, monkeypatch):
    pytest.importorskip("gymnasium")
    pytest.importorskip("matplotlib")
    from resonant.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "cartpole", "--episodes", "3", "--no-progress"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "runs/engram_cartpole_seed0/engram_cartpole_seed0.json", "runs/engram_cartpole_seed0/engram_cartpole_seed0.png"]
    report = json.loads((tmp_path / "runs/engram_cartpole_seed0/engram_cartpole_seed0.json").read_text())
    summary = report["summary"]
    assert summary["episodes"] == 3 and summary["mean_return"] == pytest.approx(sum(report["episode_returns"]) / 3)
    assert summary["last100_mean_return"] is None  # 3 episodes are not the last 100


def test_demo_and_benchmarks_default_under_runs():
    from resonant.cli import build_parser

    args = build_parser().parse_args(["demo", "treeworld"])
    assert Path(args.out) == run_dir("treeworld-demo") == Path("runs/treeworld-demo")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _measure
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert Path(_measure.out_path(None, "x.json")) == Path("runs/benchmarks/x.json")
    assert Path(_measure.out_path("elsewhere", "x.json")) == Path("elsewhere/x.json")


def test_write_text_atomic_replaces_whole_files_only(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "result.json"
    write_text_atomic(target, "first\n")
    assert target.read_text() == "first\n"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "second\n")
    assert target.read_text() == "first\n"  # the old file is intact and no temporary file is left
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]
