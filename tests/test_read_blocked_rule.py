"""Which dense reads without a threshold take the blocked forward (resonant_kernels/backends/cpu_blocked.py,
`faster_forward`; BENCHMARKS.md "Dense reads without a threshold: the blocked path or the fused kernel"):
float32 values of at most 4 MiB (a batch row's M · E · 4 bytes), not from E = 1024 with 256 queries or
fewer; float64 only 4 queries or fewer with values of at most 16 MiB. The others take the fused
kernel (csrc/read_dense_cpu.cpp), on any number of threads. Each read on the fused side of a bound is
also checked with its gradients against the float64 oracle: its backward is the blocked one (E ≥ 64)."""
from __future__ import annotations

import pytest
import torch

import resonant_kernels as rk
from backends import marks
from resonant.parallel.server import torch_threads as threads
from test_read_cpu_paths import check_against_oracle, forward_paths, make

pytestmark = marks("cpu", "gaussian_read")


def path_of(Q, M, E, dtype, count):
    q, qs, m, ms, z = make(Q, M, 2, E, dtype, "float", Q + M + E)
    with threads(count), forward_paths() as paths:
        rk.gaussian_read(q, qs, m, ms, z, backend="cpu")
    return paths


# (Q, M, E, threads, path), float32
FLOAT32 = [
    (17, 4096, 256, 2, "dense-blocked"),  # 4 MiB of values
    (17, 4097, 256, 2, "dense"),  # just over
    (17, 4097, 256, 1, "dense"),
    (4, 4096, 64, 1, "dense-blocked"),  # few queries, small values: kept on any thread count
    (256, 1024, 1024, 2, "dense"),  # E = 1024: the values packed per call for a few hundred queries
    (257, 1024, 1024, 2, "dense-blocked"),
    (257, 1024, 1023, 2, "dense-blocked"),
    (16, 1024, 1023, 2, "dense-blocked"),  # (below E = 1024 nothing is packed)
]


@pytest.mark.parametrize("Q, M, E, count, path", FLOAT32)
def test_float32_values_beyond_4_mib_or_packed_for_few_queries_take_the_fused_kernel(Q, M, E, count, path):
    assert path_of(Q, M, E, torch.float32, count) == [path]


# (Q, M, E, threads, path), float64: 8192 × 256 doubles are 16 MiB
FLOAT64 = [
    (4, 2048, 256, 2, "dense-blocked"),
    (5, 2048, 256, 2, "dense"),
    (4, 8192, 256, 2, "dense-blocked"),
    (4, 8193, 256, 2, "dense"),
    (4, 40, 64, 1, "dense-blocked"),
    (1000, 40, 64, 2, "dense"),
]


@pytest.mark.parametrize("Q, M, E, count, path", FLOAT64)
def test_float64_takes_the_blocked_forward_only_for_a_few_queries(Q, M, E, count, path):
    assert path_of(Q, M, E, torch.float64, count) == [path]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_choice_does_not_depend_on_the_thread_count(dtype):
    """So a forward's bits stay the same for any number of threads (docs/design.md §7): the cases
    above on either side of a bound, at most 16 MiB of values in this dtype."""
    for Q, M, E, _, _ in FLOAT32 + FLOAT64:
        if M * E * torch.empty((), dtype=dtype).element_size() <= 16 << 20:
            assert path_of(Q, M, E, dtype, 1) == path_of(Q, M, E, dtype, 2) == path_of(Q, M, E, dtype, 3)


@pytest.mark.parametrize("dtype, Q, M, E", [(torch.float32, 17, 4097, 256), (torch.float32, 256, 1024, 1024),
                                             (torch.float64, 5, 300, 70), (torch.float64, 256, 1024, 1024)])
def test_reads_the_rule_sends_to_the_fused_kernel_match_the_oracle_with_the_blocked_backward(dtype, Q, M, E):
    q, qs, m, ms, z = make(Q, M, 2, E, dtype, "per_dim", Q + M)
    with threads(2):
        check_against_oracle(q, qs, m, ms, z, None, Q + M, "dense")


def test_the_rule_leaves_the_backward_alone(monkeypatch):
    """Only the forward's choice moved: a read whose forward takes the fused kernel still runs the
    blocked backward (E ≥ BLOCKED_BACKWARD_FROM_E)."""
    from resonant_kernels.backends import cpu_blocked

    q, qs, m, ms, z = make(17, 4097, 2, 256, torch.float32, "float", 1)
    q.requires_grad_(True)
    called = []
    original = cpu_blocked.read_backward
    monkeypatch.setattr(cpu_blocked, "read_backward", lambda *args: called.append(1) or original(*args))
    with forward_paths() as paths:
        out = rk.gaussian_read(q, qs, m, ms, z, backend="cpu")
    out.sum().backward()
    assert paths == ["dense"] and called
