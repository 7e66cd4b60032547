"""Builds resonant_kernels._C (C++ CPU kernels, OpenMP, pybind11; no libtorch).

The CUDA module is built only where nvcc and a CUDA-enabled torch are both present; otherwise the
build says why it skipped it and the package works without it.
"""
import os
import shutil
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# -fno-trapping-math lets GCC if-convert and vectorise the exp loops (we never read FP flags).
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
if os.environ.get("RESONANT_NATIVE", "1") == "1" and os.uname().machine in ("x86_64", "AMD64"):
    # The extension is built on the machine that runs it; RESONANT_NATIVE=0 for portable builds.
    CXX_FLAGS.append("-march=native")

cpu_ext = Pybind11Extension(
    "resonant_kernels._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    extra_compile_args=CXX_FLAGS,
    extra_link_args=["-fopenmp"],
    cxx_std=20,
)


def cuda_build_reason():
    """None when the CUDA module can be built here, else why not."""
    if os.environ.get("RESONANT_NO_CUDA") == "1":
        return "RESONANT_NO_CUDA=1"
    if shutil.which("nvcc") is None:
        return "nvcc not found on PATH"
    try:
        import torch
    except ImportError:
        return "torch is not importable at build time (install torch first, build with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return None


reason = cuda_build_reason()
extensions = [cpu_ext]
if reason is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from csrc.cuda.build import cuda_extension, CudaBuildExt  # noqa: E402

    extensions.append(cuda_extension())
    build_cls = CudaBuildExt
else:
    print(f"resonant-kernels: skipping the CUDA backend build: {reason}", file=sys.stderr)
    build_cls = build_ext

setup(ext_modules=extensions, cmdclass={"build_ext": build_cls})
