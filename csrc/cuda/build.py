"""Build of resonant_kernels._C_cuda: .cu files compiled by nvcc, the pybind11 bindings by the host
compiler, linked against the static CUDA runtime (no libtorch, no runtime library path to set).

setup.py imports this only where nvcc and a CUDA-enabled torch are both present. The same flags
serve `make check-cuda` (csrc/cuda/Makefile calls `python csrc/cuda/build.py --print-nvcc-flags`),
so CI compiles exactly what a GPU install would.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
        raise RuntimeError("nvcc not found (set NVCC or put it on PATH)")
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


def cuda_extension():
    from pybind11.setup_helpers import Pybind11Extension

    home = cuda_home()
    return Pybind11Extension(
        "resonant_kernels._C_cuda",
        [os.path.relpath(os.path.join(HERE, "bindings_cuda.cpp"), ROOT), *cuda_sources()],
        include_dirs=[CSRC, os.path.join(home, "include")],
        library_dirs=[cuda_lib_dir(home)],
        libraries=["cudart_static", "rt", "pthread", "dl"],
        extra_compile_args=["-O3"],
        cxx_std=20,
    )


def _build_ext_base():
    from pybind11.setup_helpers import build_ext

    return build_ext


class CudaBuildExt(_build_ext_base()):
    """build_ext that hands .cu sources to nvcc and links their objects into the extension."""

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            nvcc = find_nvcc()
            objects = []
            for src in cu:
                obj = os.path.join(self.build_temp, "cuda", os.path.splitext(os.path.basename(src))[0] + ".o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                cmd = [nvcc, *nvcc_flags(), "-c", src, "-o", obj]
                print(" ".join(cmd), file=sys.stderr)
                subprocess.check_call(cmd)
                objects.append(obj)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = [*(ext.extra_objects or []), *objects]
        super().build_extension(ext)


if __name__ == "__main__":
    # For csrc/cuda/Makefile: the flags a real build gives nvcc.
    if sys.argv[1:] == ["--print-nvcc-flags"]:
        print(" ".join(nvcc_flags()))
    else:
        sys.exit("usage: build.py --print-nvcc-flags")
