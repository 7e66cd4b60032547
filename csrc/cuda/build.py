"""Build of resonant_kernels._C_cuda: .cu files compiled by nvcc, the pybind11 bindings by the host
compiler, linked against the static CUDA runtime (no libtorch, no runtime library path to set).

The kernels take raw device pointers, so nothing here needs torch: setup.py builds the module
wherever nvcc and a CUDA toolkit are found (`cuda_build_reason`), and `BuildExt` records what it
built, or why not, in resonant_kernels/_build_info.json for `resonant_kernels.backends()`. The same
flags serve `make check-cuda` (csrc/cuda/Makefile calls `python csrc/cuda/build.py
--print-nvcc-flags`), so CI compiles exactly what a GPU install would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from glob import glob

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
ROOT = os.path.dirname(CSRC)

# sm_80 (A100) and sm_90 (H100/H200) machine code, plus compute_90 PTX so newer GPUs JIT it.
# RESONANT_CUDA_ARCHS="80;86;90" overrides the list.
DEFAULT_ARCHS = "80;90"

# Exact maths on purpose: no --use_fast_math (its exp/log/division would make the weights differ
# from the reference by more than the test tolerances); -O3 still fuses multiply-adds.
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]


def gencode_flags(archs: str | None = None) -> list[str]:
    archs = [a.strip() for a in (archs or os.environ.get("RESONANT_CUDA_ARCHS", DEFAULT_ARCHS)).split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def nvcc_flags() -> list[str]:
    return [*NVCC_FLAGS, *gencode_flags(), f"-I{CSRC}"]


def find_nvcc() -> str:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        raise RuntimeError("nvcc was not found (no $NVCC, none on PATH)")
    return nvcc


def cuda_home(nvcc: str | None = None) -> str:
    """CUDA_HOME / CUDA_PATH, else the toolkit nvcc belongs to (nvcc may be a wrapper script, so
    its own report of the toolkit root is the last resort)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = nvcc or find_nvcc()
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-v", "-c", "x.cu"], capture_output=True, text=True).stderr
        candidates += [line.split("TOP=", 1)[1].strip() for line in dry.splitlines() if "TOP=" in line]
    except OSError:
        pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.realpath(home)
    raise RuntimeError(f"no CUDA toolkit with include/cuda_runtime.h among {[c for c in candidates if c]}")


def cuda_lib_dir(home: str) -> str:
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib")):
        path = os.path.join(home, sub)
        if glob(os.path.join(path, "libcudart_static.a")) or glob(os.path.join(path, "libcudart.so*")):
            return path
    raise RuntimeError(f"libcudart not found under {home}")


def cuda_sources() -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob(os.path.join(HERE, "*.cu")))


def cuda_build_reason() -> str | None:
    """None when the CUDA module can be built here, else why not (a sentence for the user)."""
    if os.environ.get("RESONANT_NO_CUDA") == "1":
        return "RESONANT_NO_CUDA=1 was set at build time"
    try:
        cuda_lib_dir(cuda_home(find_nvcc()))
    except RuntimeError as exc:
        return str(exc)
    return None


def cuda_required() -> bool:
    return os.environ.get("RESONANT_REQUIRE_CUDA") == "1"


def cuda_extension():
    from pybind11.setup_helpers import Pybind11Extension

    home = cuda_home()
    return Pybind11Extension(
        CUDA_MODULE,
        [os.path.relpath(os.path.join(HERE, "bindings_cuda.cpp"), ROOT), *cuda_sources()],
        include_dirs=[CSRC, os.path.join(home, "include")],
        library_dirs=[cuda_lib_dir(home)],
        libraries=["cudart_static", "rt", "pthread", "dl"],
        extra_compile_args=["-O3"],
        cxx_std=20,
    )


def build_jobs() -> int:
    """Parallel compile jobs: RESONANT_BUILD_JOBS, else one per CPU."""
    return max(1, int(os.environ.get("RESONANT_BUILD_JOBS", "0")) or os.cpu_count() or 1)


def _build_ext_base():
    from pybind11.setup_helpers import build_ext

    return build_ext


CUDA_MODULE = "resonant_kernels._C_cuda"
BUILD_INFO = "_build_info.json"  # inside the resonant_kernels package; read by resonant_kernels._backends


def warn(message: str) -> None:
    """Says `message` where a person installing sees it without `pip -v`: pip (before 26.3) and
    other frontends hide a successful build's output, so besides stderr (logs, -v) and a
    UserWarning (which pip >= 26.3 shows) the line goes to the controlling terminal, if any."""
    line = f"WARNING: {message}"
    print(line, file=sys.stderr)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass  # no terminal (CI, IDEs): stderr and the warning carry it
    warnings.warn(message, stacklevel=2)


class BuildExt(_build_ext_base()):
    """build_ext that hands .cu sources to nvcc, builds the CUDA module as an optional extension
    (a failed CUDA build warns and leaves the CPU package working, unless RESONANT_REQUIRE_CUDA=1)
    and records the outcome in resonant_kernels/_build_info.json."""

    cuda_skip_reason: str | None = None  # set by setup.py when the CUDA module is not attempted

    def run(self):
        self.cuda_note = self.cuda_skip_reason
        super().run()
        if self.cuda_note is not None:
            warn(f"resonant-kernels: the CUDA backend was not built ({self.cuda_note}); the cpu, reference "
                 f"and triton backends are unaffected, and resonant_kernels.backends() repeats this reason")
        self._write_build_info()

    def build_extension(self, ext):
        if ext.name != CUDA_MODULE:
            return super().build_extension(ext)
        try:
            self._compile_cuda_sources(ext)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any failure of the optional module leaves the CPU build
            if cuda_required():
                raise
            self.cuda_note = f"compiling it failed ({type(exc).__name__}: {exc}; the compiler output is above)"

    def _compile_cuda_sources(self, ext) -> None:
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if not cu:
            return
        nvcc = find_nvcc()
        objects = [os.path.join(self.build_temp, "cuda", os.path.splitext(os.path.basename(src))[0] + ".o")
                   for src in cu]
        os.makedirs(os.path.join(self.build_temp, "cuda"), exist_ok=True)
        commands = [[nvcc, *nvcc_flags(), "-c", src, "-o", obj] for src, obj in zip(cu, objects)]
        for cmd in commands:
            print(" ".join(cmd), file=sys.stderr)
        with ThreadPoolExecutor(min(build_jobs(), len(commands))) as pool:
            for done in pool.map(lambda cmd: subprocess.run(cmd), commands):
                if done.returncode != 0:
                    raise subprocess.CalledProcessError(done.returncode, done.args)
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = [*(ext.extra_objects or []), *objects]

    def _write_build_info(self) -> None:
        info = {"cuda": {"built": self.cuda_note is None, "reason": self.cuda_note}}
        package = CUDA_MODULE.rsplit(".", 1)[0]
        targets = {os.path.join(self.build_lib, *package.split("."))}
        if self.inplace:  # editable install: the extensions land in the source tree
            targets.add(self.get_finalized_command("build_py").get_package_dir(package))
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BUILD_INFO), "w") as f:
                json.dump(info, f, indent=1)
                f.write("\n")


if __name__ == "__main__":
    # For csrc/cuda/Makefile: the flags a real build gives nvcc.
    if sys.argv[1:] == ["--print-nvcc-flags"]:
        print(" ".join(nvcc_flags()))
    else:
        sys.exit("usage: build.py --print-nvcc-flags")
