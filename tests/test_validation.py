import math
import re

import pytest
import torch

import resonant_kernels as rk


def raises(exc, message):
    """pytest.raises matching `message` literally."""
    return pytest.raises(exc, match=re.escape(message))


# ---- gaussian_read --------------------------------------------------------------------------------

def good(dtype=torch.float32):
    return dict(query_loc=torch.zeros(4, 2, dtype=dtype), query_sd=1.0, mem_loc=torch.zeros(5, 2, dtype=dtype),
                mem_sd=torch.ones(5, 2, dtype=dtype), mem_values=torch.zeros(5, 3, dtype=dtype))


def call(**over):
    kw = good()
    backend = over.pop("backend", "cpu")
    threshold = over.pop("match_threshold", None)
    kw.update(over)
    return rk.gaussian_read(kw["query_loc"], kw["query_sd"], kw["mem_loc"], kw["mem_sd"], kw["mem_values"],
                            match_threshold=threshold, backend=backend)


READ_BAD = [
    (dict(query_loc=torch.zeros(4, 3)), ValueError, "location dimension"),
    (dict(query_loc=torch.zeros(2, 2, 4, 2)), ValueError, "query_loc must have shape"),
    (dict(mem_values=torch.zeros(6, 3)), ValueError, "mem_values has 6"),
    (dict(mem_loc=torch.zeros(5)), ValueError, "mem_loc must have at least 2"),
    (dict(mem_values=torch.zeros(5, 3, dtype=torch.float64)), ValueError, "mem_values"),
    (dict(query_loc=torch.zeros(4, 2, dtype=torch.float64)), TypeError, "query_loc has dtype"),
    (dict(query_loc=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "query_loc has dtype int64"),
    (dict(query_loc=torch.zeros(4, 2, device="meta")), ValueError, "query_loc is on meta"),
    (dict(query_sd=0.0), ValueError, "query_sd must be positive"),
    (dict(query_sd=-1.0), ValueError, "query_sd must be positive"),
    (dict(query_sd=math.inf), ValueError, "query_sd must be positive and finite"),
    (dict(mem_sd=torch.tensor([[1.0, 0.0]] * 5)), ValueError, "mem_sd must be positive"),
    (dict(mem_sd=torch.full((5, 2), math.nan)), ValueError, "mem_sd contains non-finite"),
    (dict(mem_sd=torch.ones(3, 2)), ValueError, "mem_sd of shape (3, 2) does not broadcast"),
    (dict(query_sd="wide"), TypeError, "query_sd must be a positive float"),
    (dict(query_loc=torch.tensor([[0.0, math.nan]] * 4)), ValueError, "query_loc contains NaN"),
    (dict(mem_loc=torch.tensor([[0.0, math.inf]] * 5)), ValueError, "mem_loc contains Inf"),
    (dict(mem_values=torch.full((5, 3), math.nan)), ValueError, "mem_values contains NaN"),
    (dict(match_threshold=-1.0), ValueError, "match_threshold must be >= 0"),
    (dict(match_threshold="far"), TypeError, "match_threshold must be a float"),
    (dict(backend="fastest"), ValueError, "unknown backend 'fastest'"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' cannot run gaussian_read"),
    (dict(query_loc=[[0.0, 0.0]]), TypeError, "query_loc must be a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,message", READ_BAD, ids=[m for _, _, m in READ_BAD])
def test_read_bad_input_raises_clear_error(over, exc, message):
    with raises(exc, message):
        call(**over)


def test_batch_dims_must_broadcast():
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        rk.gaussian_read(torch.zeros(3, 4, 2), 1.0, torch.zeros(2, 5, 2), 1.0, torch.zeros(2, 5, 3))


def test_cpu_rejects_mixed_value_dtype_with_reason():
    with pytest.raises(ValueError, match="needs mem_values in float32, got bfloat16"):
        call(mem_values=torch.zeros(5, 3, dtype=torch.bfloat16))
    # the reference accepts low-precision values
    out = call(mem_values=torch.zeros(5, 3, dtype=torch.bfloat16), backend="reference")
    assert out.dtype == torch.bfloat16


# ---- leave_one_out and prune_mask -----------------------------------------------------------------

def test_leave_one_out_and_prune_mask_bad_arguments_are_named():
    loc, z = torch.zeros(4, 2), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="mem_sd"):
        rk.leave_one_out(loc, -1.0, z)
    with pytest.raises(ValueError, match="mem_values"):
        rk.leave_one_out(loc, 1.0, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="match_threshold"):
        rk.prune_mask(loc, 1.0, z, max_error=0.1, match_threshold=-1.0)
    with pytest.raises(TypeError, match="max_error"):
        rk.prune_mask(loc, 1.0, z, max_error="0.1")
    with pytest.raises(ValueError, match="max_error"):
        rk.prune_mask(loc, 1.0, z, max_error=math.nan)
    with pytest.raises(ValueError, match="max_steps"):
        rk.prune_mask(loc, 1.0, z, max_error=0.1, max_steps=-1)
    with pytest.raises(ValueError, match="unknown backend"):
        rk.leave_one_out(loc, 1.0, z, backend="gpu")
    with pytest.raises(ValueError, match="cpu"):
        rk.prune_mask(loc, 1.0, z.double(), max_error=0.1, backend="cpu")


# ---- conditional_probs and conditional_sample -------------------------------------------------------

def good_sampling():
    return dict(mem_loc=torch.zeros(5, 2), mem_sd=1.0, mem_values=torch.zeros(5, 3), search_key=torch.zeros(4, 3))


SAMPLE_BAD = [
    (dict(mem_loc=torch.zeros(0, 2), mem_values=torch.zeros(0, 3)), ValueError, "nothing to sample"),
    (dict(search_key=torch.zeros(4, 2)), ValueError, "search_key has value dimension 2"),
    (dict(search_key=torch.zeros(2, 4, 3)), ValueError, "search_key must have shape"),
    (dict(search_key=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "search_key has dtype"),
    (dict(search_key=torch.full((4, 3), math.nan)), ValueError, "search_key contains NaN"),
    (dict(temperature=0.0), ValueError, "temperature must be positive"),
    (dict(temperature=-2.0), ValueError, "temperature must be positive"),
    (dict(location_temperature=math.inf), ValueError, "location_temperature must be positive"),
    (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
    (dict(num_samples=2.0), TypeError, "num_samples must be an int"),
    (dict(sigma_scale=-0.1), ValueError, "sigma_scale must be >= 0"),
    (dict(search_loc=torch.zeros(4, 2)), ValueError, "search_loc and search_sd must be given together"),
    (dict(search_sd=1.0), ValueError, "search_loc and search_sd must be given together"),
    (dict(search_loc=torch.zeros(4, 3), search_sd=1.0), ValueError, "search_loc has location dimension 3"),
    (dict(search_loc=torch.zeros(4, 2), search_sd=0.0), ValueError, "search_sd must be positive"),
    (dict(search_loc=torch.zeros(3, 2), search_sd=1.0), ValueError, "batch dimensions do not broadcast"),
    (dict(match_threshold=-1.0), ValueError, "match_threshold must be >= 0"),
    (dict(generator=7), TypeError, "generator must be a torch.Generator"),
    (dict(backend="fastest"), ValueError, "unknown backend 'fastest'"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' cannot run conditional_sample"),
]


@pytest.mark.parametrize("over,exc,message", SAMPLE_BAD, ids=[m for _, _, m in SAMPLE_BAD])
def test_sampling_bad_input_raises_clear_error(over, exc, message):
    kw = {**good_sampling(), **over}
    positional = [kw.pop(k) for k in ("mem_loc", "mem_sd", "mem_values", "search_key")]
    with raises(exc, message):
        rk.conditional_sample(*positional, **kw)


def test_empty_memory_raises_for_probs_too():
    with pytest.raises(ValueError, match="nothing to sample"):
        rk.conditional_probs(torch.zeros(0, 2), 1.0, torch.zeros(0, 3), torch.zeros(3))
