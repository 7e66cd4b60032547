import math

import pytest
import torch

import resonant_kernels as rk


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


BAD = [
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


@pytest.mark.parametrize("over,exc,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_clear_error(over, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
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
