"""The package as a dependency: sdist and wheel from `python -m build`, the wheel in a fresh venv.

The build runs without isolation (the build requirements are this environment's, so the test
needs no network) on a copy of the checkout's files, with the CUDA module switched off
(RESONANT_NO_CUDA=1: `make install` compiles it wherever nvcc is found) so the wheel must say so.
The fresh venv gets only the wheel; torch, numpy and tqdm are lent from this environment through a
.pth line added after the install (a fresh resolve of torch>=2.4 would download gigabytes of CUDA
wheels), so every resonant module imported there comes from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from checkout import checkout_files, copy_checkout, have_git_checkout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    if not have_git_checkout():
        pytest.skip("needs a git checkout to know which files a clone has")
    pytest.importorskip("build", reason="the `test` extra installs `build`")
    src = copy_checkout(tmp_path_factory.mktemp("src"), skip=("benchmarks/results/",))
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "RESONANT_NO_CUDA": "1", "RESONANT_NATIVE": "0"}
    # sdist first, then the wheel built from the unpacked sdist: a file missing from the sdist fails here
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], env=env,
                   check=True, capture_output=True)
    sdist, = out.glob("resonant_kernels-*.tar.gz")
    wheel, = out.glob("resonant_kernels-*.whl")
    return sdist, wheel


def test_sdist_carries_every_build_source(dist):
    sdist, _ = dist
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for f in checkout_files():
        if f.startswith(("csrc/", "resonant_kernels/", "python_api/")) or f in ("setup.py", "pyproject.toml",
                                                                               "MANIFEST.in", "README.md"):
            assert f in names, f"{f} is missing from the sdist"


def test_wheel_contents(dist):
    _, wheel = dist
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = json.loads(zf.read("resonant_kernels/_build_info.json"))
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert any(n.startswith("resonant_kernels/_C.") and n.endswith(".so") for n in names)
    assert not any(n.startswith("resonant_kernels/_C_cuda") for n in names)
    assert {"resonant_kernels/py.typed", "resonant/py.typed", "resonant/cli.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    assert info == {"cuda": {"built": False, "reason": "RESONANT_NO_CUDA=1 was set at build time"}}
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert {"torch>=2.4", "numpy", "tqdm"} <= {r.split(";")[0].strip() for r in requires}
    assert "resonant = resonant.cli:main" in entry_points


def test_wheel_installs_and_runs_in_a_fresh_venv(dist, tmp_path):
    _, wheel = dist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "lend_parent_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = textwrap.dedent(f"""
        import torch
        import resonant, resonant_kernels as rk
        assert rk.__file__.startswith({site!r}) and resonant.__file__.startswith({site!r}), rk.__file__
        rows = {{r.name: r for r in rk.backends()}}
        assert rows["cpu"].usable, rows["cpu"].reason
        assert "RESONANT_NO_CUDA=1" in rows["cuda"].reason, rows["cuda"].reason
        g = torch.Generator().manual_seed(0)
        q, m, z = torch.randn(5, 2, generator=g), torch.randn(7, 2, generator=g), torch.randn(7, 3, generator=g)
        fused = rk.gaussian_read(q, 0.5, m, 0.7, z, backend="cpu")
        torch.testing.assert_close(fused, rk.gaussian_read(q, 0.5, m, 0.7, z, backend="reference"))
        print("ok")
    """)
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    cli = subprocess.run([str(venv / "bin" / "resonant"), "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "train" in cli.stdout, cli.stderr


def test_install_records_whether_the_cuda_module_was_built():
    """`make install` builds the CUDA module wherever nvcc is found, with or without a GPU."""
    import resonant_kernels
    from resonant_kernels.backends import cuda

    record = Path(resonant_kernels.__file__).with_name("_build_info.json")
    if not record.exists():
        pytest.skip("this install predates the build record")
    info = json.loads(record.read_text())["cuda"]
    if info["built"]:
        import resonant_kernels._C_cuda  # noqa: F401 - importable without a GPU
        assert cuda._build_note() is None
    else:
        assert info["reason"] and info["reason"] in cuda._available()
        if shutil.which("nvcc") and "RESONANT_NO_CUDA" not in info["reason"]:
            pytest.fail(f"nvcc is on PATH but the install did not build the CUDA module: {info['reason']}")
