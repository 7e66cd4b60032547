"""The backend registry: backends(), which backend `auto` picks, the reasons a backend cannot run a
call, the dtype rules, and the test table (tests/backends.py) against what the backends register."""
import importlib.util
import sys

import pytest
import torch

import backends
import resonant_kernels as rk
from backends import HALF_VALUES, IMPLEMENTS, NAMES, OPS, broken, interpreted, marks, reason, skip_unless_usable
from cases import OP_CALLS, op_inputs
from resonant_kernels import _registry


def test_backends_table(capsys):
    rows_ = rk.backends()
    assert capsys.readouterr().out == ""  # the REPL shows the returned table once, through its repr
    printed = repr(rows_)
    assert printed == str(rows_) and printed.splitlines()[0].split() == ["backend", "usable", "ops", "/", "reason"]
    names = {r.name: r for r in rows_}
    assert {"reference", "cpu", "triton", "cuda"} <= set(names)
    assert names["cpu"].usable and names["reference"].usable
    if not torch.cuda.is_available():
        assert not names["cuda"].usable and "CUDA" in names["cuda"].reason
    for r in rows_:
        assert r.name in printed
        if not r.usable:
            assert r.reason and r.reason in printed


@pytest.mark.parametrize("backend", [pytest.param(b, marks=marks(b, needs="module")) for b in NAMES])
def test_the_test_table_lists_what_each_backend_registers(backend):
    """A backend registers its kernels whether or not it can run here (cuda without a GPU), so the
    table's rows of an op it lacks fail instead of skipping."""
    assert set(_registry.BACKENDS[backend].ops()) == set(IMPLEMENTS[backend])


@pytest.mark.parametrize("backend", NAMES)
def test_no_backend_is_broken(backend):
    """Every install has reference and cpu; the others' modules import without their device or
    extension, lacking at most their optional package (then backends() says so)."""
    assert broken(backend) is None


def _unusable(name, why):
    return _registry.BackendInfo(name, False, why, (), "")


def test_what_this_machine_lacks_skips_a_row_and_a_bug_fails_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    # unusable with its module imported: skipped with backends()' reason, and marked gpu
    monkeypatch.setitem(backends.AVAILABILITY, "cuda", _unusable("cuda", "no CUDA device is visible to torch"))
    skip, gpu = marks("cuda", "gaussian_read")
    assert skip.name == "skipif" and skip.args == (True,) and gpu.name == "gpu"
    assert skip.kwargs["reason"] == "cuda backend cannot run gaussian_read: no CUDA device is visible to torch"
    # its module failed to import: a bug, the row fails with the cause
    monkeypatch.delitem(sys.modules, "resonant_kernels.backends.cuda")
    [fail] = marks("cuda", "gaussian_read")
    assert fail.name == "backend_broken" and "cuda backend is broken" in fail.kwargs["reason"]
    # a module that cannot import for want of its optional package (triton): skipped
    failed = "its module failed to import (ModuleNotFoundError: No module named 'triton')"
    monkeypatch.setitem(backends.AVAILABILITY, "triton", _unusable("triton", failed))
    monkeypatch.delitem(sys.modules, "resonant_kernels.backends.triton")
    skip, *_ = marks("triton", "leave_one_out")
    assert skip.name == "skipif" and skip.args == (True,) and failed in skip.kwargs["reason"]
    # a backend every install has that cannot run: the install is broken, the row fails
    monkeypatch.setitem(backends.AVAILABILITY, "cpu", _unusable("cpu", "the compiled CPU extension ..."))
    [fail] = marks("cpu", "prune_mask")
    assert fail.name == "backend_broken" and "every install has the cpu backend" in fail.kwargs["reason"]
    with pytest.raises(pytest.fail.Exception, match="every install has the cpu backend"):
        skip_unless_usable("cpu")


def test_a_row_marked_backend_broken_fails_at_setup():
    import conftest

    class Row:
        @staticmethod
        def get_closest_marker(name):
            return pytest.mark.backend_broken(reason="the cause").mark if name == "backend_broken" else None

    with pytest.raises(pytest.fail.Exception, match="the cause"):
        conftest.pytest_runtest_setup(Row())


def test_auto_picks_cpu_for_cpu_tensors_and_triton_for_cuda_tensors():
    assert _registry.select("gaussian_read", "auto", torch.device("cpu"), torch.float32) == "cpu"
    skip_unless_usable("triton")
    # select() only inspects the device type, so this holds without a GPU too.
    assert _registry.select("gaussian_read", "auto", torch.device("cuda"), torch.float32) == "triton"


# The rows whose backend cannot run the op on CPU tensors here (cuda without a GPU, or on any CPU
# tensor; triton on CPU tensors outside the interpreter).
UNUSABLE_ON_CPU = [(op, b) for op in OPS for b in NAMES if op in IMPLEMENTS[b] and reason(b, op, on="cpu",
                                                                                           dtype=torch.float32)]


@pytest.mark.parametrize("op,backend", UNUSABLE_ON_CPU, ids=[f"{op}-{b}" for op, b in UNUSABLE_ON_CPU])
def test_requesting_a_backend_that_cannot_run_names_the_reason(op, backend):
    q, m, z, key = (t.detach() for t in op_inputs())
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run {op}") as err:
        OP_CALLS[op](q, m, z, key, backend)
    assert reason(backend, op, on="cpu", dtype=torch.float32) in str(err.value)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("op,backend", [
    pytest.param(op, b, marks=marks(b, needs="module"), id=f"{op}-{b}")
    for op in OPS for b in NAMES if b != "reference" and op in IMPLEMENTS[b]])
def test_dtype_rule_names_the_argument(op, backend):
    """float32 or float64 locations, values in the locations' dtype; gaussian_read's values also in
    half precision under float32 locations where the backend takes them (HALF_VALUES), except
    bfloat16 under the Triton interpreter, which has no bfloat16 arithmetic."""
    half = set(HALF_VALUES.get(backend, ())) if op == "gaussian_read" else set()
    allowed = {(torch.float32, torch.float32), (torch.float64, torch.float64)} | {(torch.float32, h) for h in half}
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for loc in dtypes:
        for value in dtypes:
            why = _registry.BACKENDS[backend].dtype_check(op, loc, value)
            pair = f"{_dtype_name(loc)} locations, {_dtype_name(value)} values: {why}"
            if interpreted(backend) and value == torch.bfloat16:
                assert why and "interpreter" in why, pair
            elif (loc, value) in allowed:
                assert why is None, pair
            elif loc not in (torch.float32, torch.float64):
                assert why and "float32 and float64 locations" in why, pair
            else:
                assert why and "mem_values" in why and _dtype_name(value) in why, pair

