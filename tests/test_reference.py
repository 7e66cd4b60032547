"""The reference's own maths, checked by independent computations (the ground truth of every other
test: tests/test_ops.py compares each backend with it)."""
import math

import torch

import resonant_kernels as rk
from resonant_kernels import reference
from cases import chi_square_setup, notebook_memory, notebook_reference_keep, smooth_field


def naive_density_read(query_loc, query_sd, mem_loc, mem_sd, mem_values):
    """Independent check of the maths: weights from torch.distributions.Normal densities."""
    v = query_sd**2 + mem_sd**2
    logk = torch.distributions.Normal(mem_loc, v.sqrt()).log_prob(query_loc).sum(-1)
    return torch.softmax(logk, -1) @ mem_values


def test_reference_is_the_gaussian_density():
    gen = torch.Generator().manual_seed(0)
    q, m = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen, dtype=torch.float64)
    qs, ms = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.2, torch.rand(6, 3, generator=gen, dtype=torch.float64) + 0.2
    z = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    logk = reference.log_kernel(q, qs**2, m, ms**2)
    for i in range(4):
        for j in range(6):
            v = qs[i] ** 2 + ms[j] ** 2
            expected = torch.distributions.Normal(m[j], v.sqrt()).log_prob(q[i]).sum()
            assert abs(float(logk[i, j] - expected)) < 1e-12
    want = torch.stack([naive_density_read(q[i], qs[i], m, ms, z) for i in range(4)])
    torch.testing.assert_close(rk.gaussian_read(q, qs, m, ms, z, backend="reference"), want)


def test_reference_reads_each_entry_from_the_others():
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64)
    sd = torch.rand(2, 9, 3, generator=gen, dtype=torch.float64) + 0.3
    z = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64)
    estimate, error, num_dependencies = rk.leave_one_out(loc, sd, z, backend="reference")
    for b in range(2):
        for i in range(9):
            others = torch.arange(9) != i
            want = rk.gaussian_read(loc[b, i], sd[b, i], loc[b, others], sd[b, others], z[b, others],
                                    backend="reference")
            torch.testing.assert_close(estimate[b, i], want)
            assert abs(float(error[b, i] - (want - z[b, i]).norm())) < 1e-12
            logk = torch.distributions.Normal(loc[b, others], (sd[b, i] ** 2 + sd[b, others] ** 2).sqrt())
            w = torch.softmax(logk.log_prob(loc[b, i]).sum(-1), -1)
            assert int(num_dependencies[b, i]) == int((w > 1 / 9).sum())


def test_notebook_style_pruning_keeps_the_read():
    """design.md §3's notebook case with a smooth field in place of the tree-world sensor (each
    fused backend gives the same keep: test_ops.py)."""
    loc, values, centers, directions, gen = notebook_memory()
    keep = notebook_reference_keep()
    removed = 1024 - int(keep.sum())
    assert removed >= 200, removed  # a substantial share goes

    axis = torch.linspace(-200, 200, 100, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    before = rk.gaussian_read(grid, 10.0, loc, 10.0, values, match_threshold=25.0)
    after = rk.gaussian_read(grid, 10.0, loc[keep], 10.0, values[keep], match_threshold=25.0)
    moved = float((after - before).norm(dim=-1).mean())
    field_norm = float(smooth_field(grid, centers, directions).norm(dim=-1).mean())
    assert moved < 0.05 * field_norm, (moved, field_norm)
    # Pruning that ignores the rule (dropping as many entries at random) moves the read far more.
    random_keep = torch.ones(1024, dtype=torch.bool)
    random_keep[torch.randperm(1024, generator=gen)[:removed]] = False
    after_random = rk.gaussian_read(grid, 10.0, loc[random_keep], 10.0, values[random_keep], match_threshold=25.0)
    assert float((after_random - before).norm(dim=-1).mean()) > 1.5 * moved


def test_reference_probs_follow_the_formula():
    """An independent, loop-by-loop computation of §4's logits, including the all-masked fallback."""
    gen = torch.Generator().manual_seed(0)
    M, d, E = 6, 3, 5
    mem_loc = torch.randn(M, d, generator=gen, dtype=torch.float64)
    mem_sd = torch.rand(M, d, generator=gen, dtype=torch.float64) + 0.3
    mem_values = torch.randn(M, E, generator=gen, dtype=torch.float64)
    key = torch.randn(3, E, generator=gen, dtype=torch.float64)
    search_loc = torch.stack([mem_loc[0] + 0.1, mem_loc[1] - 0.2, torch.full((d,), 50.0, dtype=torch.float64)])
    search_sd = torch.rand(3, d, generator=gen, dtype=torch.float64) + 0.3
    T, LT, theta = 0.8, 1.7, 1.5
    got = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=search_loc, search_sd=search_sd,
                               temperature=T, location_temperature=LT, match_threshold=theta, backend="reference")
    for q in range(3):
        logits = []
        for t in range(M):
            drive = float(key[q] @ mem_values[t]) / math.sqrt(E) / T
            far = float((search_loc[q] - mem_loc[t]).norm()) > theta
            v = search_sd[q] ** 2 + mem_sd[t] ** 2
            logk = float(torch.distributions.Normal(mem_loc[t], v.sqrt()).log_prob(search_loc[q]).sum())
            logits.append((drive, None if far else drive + logk / LT))
        if all(loc is None for _, loc in logits):  # third query: nothing within θ
            want = torch.softmax(torch.tensor([dr for dr, _ in logits], dtype=torch.float64), 0)
        else:
            want = torch.softmax(torch.tensor([-math.inf if loc is None else loc for _, loc in logits],
                                              dtype=torch.float64), 0)
        torch.testing.assert_close(got[q], want)
    assert (got[0] > 0).sum() < M  # the threshold did mask something in a matched row


def test_reference_probs_are_differentiable():
    args, kw = chi_square_setup(torch.float64)
    inputs = [a.clone().requires_grad_() for a in args]
    probs = rk.conditional_probs(*inputs, backend="reference", **kw)
    probs[:, :5].sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)
