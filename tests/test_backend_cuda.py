"""What only the cuda backend (csrc/cuda) has: its build (flags, toolkit), its reason when unusable,
launches on the current stream, and the location-dimension limit of its register arrays. Its
correctness against the reference is tests/test_ops.py's (`pytest -m gpu` on a GPU machine)."""
import os
import shutil
import sys

import pytest
import torch

import resonant_kernels as rk
from backends import reason, requires, table
from cases import TOL, Case, make_inputs, sample_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- everywhere (CPU CI) -------------------------------------------------------------------------

@requires("cuda", needs="module")
def test_backend_table_gives_the_reason_cuda_is_unusable():
    row = next(r for r in rk.backends(print_table=False) if r.name == "cuda")
    if not torch.cuda.is_available():
        assert not row.usable and "CUDA device" in row.reason
    elif reason("cuda") is not None:
        assert not row.usable and "_C_cuda" in row.reason


def _build_module():
    sys.path.insert(0, ROOT)
    try:
        from csrc.cuda import build
    finally:
        sys.path.remove(ROOT)
    return build


def test_build_flags_target_ampere_and_hopper_without_fast_math():
    build = _build_module()
    flags = build.gencode_flags("80;90")
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert any(f.endswith("code=compute_90") for f in flags)  # PTX for newer GPUs
    assert not any("fast_math" in f or "fast-math" in f for f in build.nvcc_flags())
    sources = build.cuda_sources()
    assert {"csrc/cuda/read.cu", "csrc/cuda/sample.cu"} <= set(sources)
    assert all(os.path.exists(os.path.join(ROOT, s)) for s in sources)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_build_finds_the_cuda_toolkit_of_nvcc():
    build = _build_module()
    home = build.cuda_home()
    assert os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
    assert os.path.isdir(build.cuda_lib_dir(home))


# ---- on a GPU -------------------------------------------------------------------------------------

def _read(q, qs, m, ms, z, key, backend):
    return rk.gaussian_read(q, qs, m, ms, z, backend=backend)


def _probs(q, qs, m, ms, z, key, backend):
    return rk.conditional_probs(m, ms, z, key, search_loc=q, search_sd=qs, backend=backend)


# (the op, its inputs: (query or search) loc and sd, memory loc, sd, values, search key)
STREAM_CALLS = {
    "gaussian_read": (_read, Case((3,), 50, 500, 2, 256, "per_dim", None)),
    "conditional_probs": (_probs, Case((3,), 50, 2000, 2, 256, "float", None)),
}


@pytest.mark.parametrize("op,backend", table(list(STREAM_CALLS), backends=["cuda"]))
def test_runs_on_the_current_stream(op, backend):
    fn, case = STREAM_CALLS[op]
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = sample_inputs(case, torch.float32, device="cuda")
    args = (query_loc, query_sd, mem_loc, mem_sd, mem_values, key)
    want = fn(*args, "reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fn(*args, backend)
    side.synchronize()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@requires("cuda", "gaussian_read")
def test_location_dim_limit_is_a_clear_error():
    """d > 16 is a clear error for the read and for sampling with a search location; sampling
    without one never reads the locations."""
    q, qs, m, ms, z = make_inputs(Case((), 3, 5, 17, 2, "float", None), device="cuda")
    with pytest.raises(ValueError, match="location dimension d <= 16"):
        rk.gaussian_read(q, qs, m, ms, z, backend="cuda")
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = sample_inputs(
        Case((), 3, 20, 17, 4, "float", None), torch.float64, device="cuda")
    with pytest.raises(ValueError, match="location dimension d <= 16"):
        rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=query_loc, search_sd=query_sd,
                             backend="cuda")
    torch.testing.assert_close(rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="cuda"),
                               rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="reference"))
