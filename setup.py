"""Builds resonant_kernels._C (C++ CPU kernels, OpenMP, pybind11; no libtorch) and, wherever nvcc
and a CUDA toolkit are found, resonant_kernels._C_cuda (CUDA kernels on raw device pointers: torch
is not needed at build time, so build isolation does not matter).

Build switches (environment variables, README "Install as a dependency"):
  RESONANT_NATIVE=0        portable CPU code (no -march=native)
  RESONANT_NO_CUDA=1       do not build the CUDA module
  RESONANT_REQUIRE_CUDA=1  fail the install when the CUDA module cannot be built
  RESONANT_CUDA_ARCHS      GPU architectures, e.g. "80;86;90" (default "80;90")
  RESONANT_BUILD_JOBS      parallel compile jobs (default: one per CPU)
A CUDA module that is not built is reported in a warning and by resonant_kernels.backends().
"""
import os
import sys
from glob import glob

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
except ImportError:  # only without build isolation: pip installs the build requirements otherwise
    raise SystemExit(
        "resonant-kernels: building needs pybind11. With --no-build-isolation, install the build "
        "requirements first: pip install 'setuptools>=68' wheel 'pybind11>=2.12'"
    ) from None
from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csrc.cuda.build import BuildExt, build_jobs, cuda_build_reason, cuda_extension, cuda_required  # noqa: E402

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

extensions = [cpu_ext]
reason = cuda_build_reason()
if reason is None:
    extensions.append(cuda_extension())
elif cuda_required():
    raise SystemExit(f"resonant-kernels: RESONANT_REQUIRE_CUDA=1 but the CUDA module cannot be built: {reason}")
BuildExt.cuda_skip_reason = reason

ParallelCompile(default=build_jobs()).install()
setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
