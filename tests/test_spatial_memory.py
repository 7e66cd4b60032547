import os
import threading

import pytest
import torch

import resonant_kernels as rk
from resonant import SpatialMemory
from resonant.memory import fuse

F64 = torch.float64


def random_memory(M=20, d=2, E=5, seed=0, max_size=None, backend="auto", sd=None):
    gen = torch.Generator().manual_seed(seed)
    memory = SpatialMemory(d, E, max_size=max_size, dtype=F64, backend=backend)
    loc = torch.randn(M, d, generator=gen, dtype=F64)
    sd = torch.rand(M, d, generator=gen, dtype=F64) * 0.5 + 0.3 if sd is None else sd
    values = torch.randn(M, E, generator=gen, dtype=F64)
    memory.write(loc, sd, values)
    return memory, loc, sd, values


# ---- write / read ------------------------------------------------------------------------------

def test_read_is_gaussian_read_of_the_written_entries():
    memory, loc, sd, values = random_memory()
    query = torch.randn(7, 2, dtype=F64)
    want = rk.gaussian_read(query, 0.4, loc, sd, values, backend="reference")
    torch.testing.assert_close(memory.read(query, 0.4), want)
    torch.testing.assert_close(memory.read(query[3], 0.4), want[3])
    batched = memory.read(query.reshape(1, 7, 2).expand(3, 7, 2), 0.4, match_threshold=0.8)
    torch.testing.assert_close(batched[2], rk.gaussian_read(query, 0.4, loc, sd, values, match_threshold=0.8,
                                                            backend="reference"))
    assert len(memory) == 20


def test_write_accepts_batches_single_observations_and_float_sd():
    memory = SpatialMemory(3, 4, dtype=F64)
    memory.write(torch.zeros(2, 5, 3, dtype=F64), 0.5, torch.ones(2, 5, 4, dtype=F64))
    memory.write(torch.ones(3, dtype=F64), torch.full((3,), 2.0, dtype=F64), torch.zeros(4, dtype=F64))
    memory.write(torch.ones(2, 3), 1.5, torch.ones(2, 4))  # float32 input is converted
    assert len(memory) == 13
    assert memory.sd.shape == (13, 3)
    assert torch.all(memory.sd[:10] == 0.5) and torch.all(memory.sd[10] == 2.0) and torch.all(memory.sd[11:] == 1.5)
    assert memory.ids.tolist() == list(range(13))
    assert memory.values.dtype == F64


def test_max_size_drops_the_oldest_in_write_order():
    memory = SpatialMemory(1, 1, max_size=5, dtype=F64)
    for start in (0, 3, 6):
        xs = torch.arange(start, start + 3, dtype=F64)[:, None]
        memory.write(xs, 1.0, xs)
    assert memory.values.flatten().tolist() == [4, 5, 6, 7, 8]
    assert memory.ids.tolist() == [4, 5, 6, 7, 8]
    big = torch.arange(100, 112, dtype=F64)[:, None]
    memory.write(big, 1.0, big)  # one write larger than max_size keeps its own newest entries
    assert memory.values.flatten().tolist() == [107, 108, 109, 110, 111]


def test_merge_radius_fuses_by_precision():
    memory = SpatialMemory(2, 2, dtype=F64)
    memory.write(torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([1.0, 0.0], dtype=F64))
    memory.write(torch.tensor([5.0, 5.0], dtype=F64), 1.0, torch.tensor([9.0, 9.0], dtype=F64))
    memory.write(torch.tensor([[0.5, -1.0]], dtype=F64), 2.0, torch.tensor([[0.0, 1.0]], dtype=F64), merge_radius=2.0)
    assert len(memory) == 2
    # per dim: precision (1, 1/4) + (1/4, 1/4) = (5/4, 1/2)
    fused_loc = torch.tensor([(1 * 0 + 0.25 * 0.5) / 1.25, (0.25 * 0 + 0.25 * -1.0) / 0.5], dtype=F64)
    fused_sd = torch.tensor([1.25, 0.5], dtype=F64).rsqrt()
    # value weights are total precisions 1.25 and 0.5
    fused_value = (1.25 * torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([0.0, 1.0])).to(F64) / 1.75
    torch.testing.assert_close(memory.loc[-1], fused_loc)
    torch.testing.assert_close(memory.sd[-1], fused_sd)
    torch.testing.assert_close(memory.values[-1], fused_value)
    torch.testing.assert_close(memory.loc[0], torch.tensor([5.0, 5.0], dtype=F64))  # untouched
    assert memory.ids.tolist() == [1, 2]  # the fused entry counts as newly written (id 0 is gone)
    memory.write(torch.tensor([20.0, 20.0], dtype=F64), 1.0, torch.zeros(2, dtype=F64), merge_radius=2.0)
    assert len(memory) == 3  # nothing within the radius: appended


def test_fuse_of_equal_observations_halves_the_variance():
    loc, sd, z = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]), torch.tensor([4.0])
    fl, fs, fz = fuse(loc, sd, z, loc, sd, z)
    torch.testing.assert_close(fl, loc)
    torch.testing.assert_close(fs, sd / 2 ** 0.5)
    torch.testing.assert_close(fz, z)


@pytest.mark.parametrize("bad, match", [
    (dict(loc=torch.zeros(4, 3)), "location dimension 3"),
    (dict(values=torch.zeros(4, 6)), "value_dim 5"),
    (dict(values=torch.zeros(3, 5)), "entries"),
    (dict(loc=torch.tensor([[0.0, float("nan")]] * 4)), "^loc contains NaN"),
    (dict(values=torch.full((4, 5), float("inf"))), "^values contains Inf"),
    (dict(sd=0.0), "^sd must be positive"),
    (dict(sd=-1.0), "^sd must be positive"),
    (dict(sd=torch.tensor([[1.0, -0.1]] * 4)), "^sd must be positive"),
    (dict(sd=float("nan")), "^sd must be positive and finite"),
    (dict(loc=[[0.0, 0.0]] * 4), "^loc must be a torch.Tensor"),
    (dict(values=torch.zeros(4, 5, dtype=F64)), "^values has dtype torch.float64 but the memory holds torch.float32"),
    (dict(loc=torch.zeros(4, 2, dtype=F64)), "^loc has dtype torch.float64 .* converting would round it"),
    (dict(sd=torch.ones(4, 2, dtype=F64)), "^sd has dtype"),
])
def test_bad_writes_name_the_argument_and_change_nothing(bad, match):
    memory = SpatialMemory(2, 5)
    args = dict(loc=torch.zeros(4, 2), sd=1.0, values=torch.zeros(4, 5))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        memory.write(args["loc"], args["sd"], args["values"])
    assert len(memory) == 0


def test_bad_constructor_and_read_arguments():
    with pytest.raises(ValueError, match="location_dim"):
        SpatialMemory(0, 3)
    with pytest.raises(ValueError, match="max_size"):
        SpatialMemory(2, 3, max_size=0)
    with pytest.raises(TypeError, match="dtype"):
        SpatialMemory(2, 3, dtype=torch.int32)
    memory, *_ = random_memory()
    with pytest.raises(ValueError, match="query_sd must be positive"):
        memory.read(torch.zeros(3, 2, dtype=F64), -1.0)
    with pytest.raises(ValueError, match="location dimension 3"):
        memory.read(torch.zeros(3, 3, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="merge_radius must be"):
        memory.write(torch.zeros(2, dtype=F64), 1.0, torch.zeros(5, dtype=F64), merge_radius=-1.0)


# ---- state -------------------------------------------------------------------------------------

def test_state_dict_and_save_load_round_trip(tmp_path):
    memory, *_ = random_memory(max_size=30)
    memory.write(torch.zeros(2, dtype=F64), 1.0, torch.ones(5, dtype=F64))
    query = torch.randn(4, 2, dtype=F64)
    path = tmp_path / "memory.pt"
    memory.save(path)
    loaded = SpatialMemory.load(path)
    assert (loaded.location_dim, loaded.value_dim, loaded.max_size, loaded.dtype) == (2, 5, 30, F64)
    for name in ("loc", "sd", "values", "ids"):
        assert torch.equal(getattr(loaded, name), getattr(memory, name)), name
    torch.testing.assert_close(loaded.read(query, 0.5), memory.read(query, 0.5), rtol=0, atol=0)
    loaded.write(torch.ones(2, dtype=F64), 1.0, torch.ones(5, dtype=F64))
    assert int(loaded.ids[-1]) == 21  # ids continue after a load

    blob = torch.load(path, weights_only=True)  # plain tensors and a JSON string, no pickled objects
    assert isinstance(blob["config"], str)
    other = SpatialMemory(2, 5, dtype=F64)
    other.load_state_dict(memory.state_dict())
    assert torch.equal(other.values, memory.values) and len(other) == 21


def test_load_rejects_foreign_files_and_bad_state(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"config": '{"format": "other"}', "state": {"loc": torch.zeros(1, 2)}}, path)
    with pytest.raises(ValueError, match="not a saved SpatialMemory"):
        SpatialMemory.load(path)
    memory, *_ = random_memory(M=3)
    state = memory.state_dict()
    state["ids"] = torch.tensor([2, 1, 0])
    with pytest.raises(ValueError, match="increasing"):
        SpatialMemory(2, 5, dtype=F64).load_state_dict(state)
    with pytest.raises(KeyError, match="next_id"):
        SpatialMemory(2, 5, dtype=F64).load_state_dict({k: v for k, v in state.items() if k != "next_id"})


def test_to_changes_dtype_and_device():
    memory, *_ = random_memory()
    assert memory.to(dtype=torch.float32) is memory
    assert memory.loc.dtype == memory.sd.dtype == memory.values.dtype == torch.float32
    assert memory.ids.dtype == torch.int64
    memory.to("cpu")
    assert memory.device.type == "cpu"
    assert memory.read(torch.zeros(2), 1.0).dtype == torch.float32


# ---- regress -----------------------------------------------------------------------------------

def test_regress_fits_the_target_reads_and_matches_the_reference_backend():
    gen = torch.Generator().manual_seed(5)
    probes = torch.randn(40, 2, generator=gen, dtype=F64)
    teacher, *_ = random_memory(M=30, seed=1)
    target = teacher.read(probes, 0.5)
    losses = {}
    for backend in ("reference", "cpu"):
        student, *_ = random_memory(M=12, seed=2, backend=backend)
        losses[backend] = student.regress(probes, 0.5, target, steps=25, lr=0.05)
        final = float((student.read(probes, 0.5) - target).pow(2).sum(-1).mean())
        assert losses[backend][-1] < 0.5 * losses[backend][0]
        assert final < losses[backend][0]
        assert bool((student.sd > 0).all())
    # the cpu backend's backward kernels drive the same optimisation as the reference autograd
    torch.testing.assert_close(torch.tensor(losses["cpu"]), torch.tensor(losses["reference"]), rtol=1e-6, atol=1e-9)


# ---- leave_one_out, prune_mask, conditional_sample --------------------------------------------

def test_leave_one_out_is_the_op_on_the_entries():
    memory, loc, sd, values = random_memory()
    got = memory.leave_one_out(match_threshold=1.0)
    want = rk.leave_one_out(loc, sd, values, match_threshold=1.0, backend="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_prune_removes_what_prune_mask_drops():
    memory, loc, sd, values = random_memory(M=60, sd=0.3)
    keep = rk.prune_mask(loc, sd, values, max_error=5.0, match_threshold=2.0, max_steps=3, backend="reference")
    assert not bool(keep.all()), "test data should prune something"
    removed = memory.prune(5.0, match_threshold=2.0, max_steps=3)
    assert removed == int((~keep).sum()) == 60 - len(memory)
    torch.testing.assert_close(memory.loc, loc[keep])
    torch.testing.assert_close(memory.values, values[keep])


def test_sample_shapes_and_seeded_reproducibility():
    memory, *_ = random_memory()
    key = torch.randn(5, dtype=F64)
    a = memory.sample(key, num_samples=8, generator=torch.Generator().manual_seed(3))
    b = memory.sample(key, num_samples=8, generator=torch.Generator().manual_seed(3))
    assert a.shape[-2:] == (8, 2)
    torch.testing.assert_close(a, b)
    near = memory.sample(key, search_loc=torch.zeros(2, dtype=F64), search_sd=0.5, num_samples=4,
                         generator=torch.Generator().manual_seed(0))
    assert near.shape[-2:] == (4, 2) and bool(torch.isfinite(near).all())


# ---- background prune with hot swap ------------------------------------------------------------

class BlockingPrune:
    """A prune_mask stand-in that drops even positions and waits until released, so a test can
    write, fuse and evict while the prune is 'running'."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.calls = []

    def __call__(self, loc, sd, values, **kw):
        self.calls.append(kw)
        self.started.set()
        assert self.release.wait(10)
        return torch.arange(loc.shape[0]) % 2 == 1


def test_background_prune_keeps_everything_written_meanwhile(monkeypatch):
    fake = BlockingPrune()
    monkeypatch.setattr(rk, "prune_mask", fake)
    memory, loc, sd, values = random_memory(M=10, max_size=14)
    handle = memory.prune(0.1, match_threshold=2.0, max_steps=4, background=True)
    assert fake.started.wait(10)
    query = torch.zeros(3, 2, dtype=F64)
    torch.testing.assert_close(memory.read(query, 0.5), rk.gaussian_read(query, 0.5, loc, sd, values))  # still full
    new = torch.arange(6, dtype=F64)[:, None].expand(6, 2) * 10 + 100
    memory.write(new, 0.5, torch.ones(6, 5, dtype=F64))  # ids 10..15; max_size evicts ids 0 and 1
    memory.write(loc[9] + 1e-3, 0.5, torch.zeros(5, dtype=F64), merge_radius=0.01)  # fuses id 9 into id 16
    assert not handle.done()
    fake.release.set()
    removed = handle.wait(10)
    assert fake.calls[0]["max_error"] == 0.1 and fake.calls[0]["max_steps"] == 4
    # snapshot ids 0..9: even ones dropped, but 0 was already evicted
    assert removed == 4  # ids 2, 4, 6, 8
    assert memory.ids.tolist() == [3, 5, 7, 10, 11, 12, 13, 14, 15, 16]
    torch.testing.assert_close(memory.loc[3:9], new)
    torch.testing.assert_close(memory.loc[:3], loc[[3, 5, 7]])


def test_background_prune_errors_reach_the_caller(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(rk, "prune_mask", broken)
    memory, *_ = random_memory()
    handle = memory.prune(0.1, background=True)
    with pytest.raises(RuntimeError, match="kernel failed"):
        handle.wait(10)
    assert len(memory) == 20


def test_real_background_prune_loses_no_concurrent_write():
    memory, loc, sd, values = random_memory(M=200, sd=0.3)
    handle = memory.prune(5.0, match_threshold=2.0, max_steps=10, background=True)
    written = []
    for i in range(30):
        x = torch.full((2,), 50.0 + i, dtype=F64)
        memory.write(x, 0.3, torch.full((5,), float(i), dtype=F64))
        written.append(x)
    removed = handle.wait(60)
    assert removed > 0
    assert len(memory) == 230 - removed
    assert memory.ids[-30:].tolist() == list(range(200, 230))
    torch.testing.assert_close(memory.loc[-30:], torch.stack(written))


def test_empty_memory_reads_zeros_and_reset_empties():
    memory = SpatialMemory(2, 3, dtype=F64)
    assert len(memory) == 0
    assert torch.equal(memory.read(torch.ones(4, 2, dtype=F64), 1.0), torch.zeros(4, 3, dtype=F64))
    memory.write(torch.ones(2, 2, dtype=F64), 1.0, torch.ones(2, 3, dtype=F64))
    assert len(memory) == 2
    memory.reset()
    assert len(memory) == 0 and memory.values.shape == (0, 3)


# ---- hardening (issue #13 points 8 and 10) ----------------------------------------------------

def _save_loop(path: str, ready) -> None:
    """Saves ever larger memories to `path` until killed (a worker process of the test below)."""
    memory = SpatialMemory(2, 256, dtype=torch.float64)
    memory.write(torch.zeros(1, 2, dtype=torch.float64), 1.0, torch.zeros(1, 256, dtype=torch.float64))
    memory.save(path)
    ready.set()
    i = 1
    while True:
        memory.write(torch.full((2000, 2), float(i), dtype=torch.float64), 1.0,
                     torch.full((2000, 256), float(i), dtype=torch.float64))
        memory.save(path)
        i += 1


def test_save_is_atomic_under_kill_9(tmp_path):
    """Point 8: whenever the saving process dies, the file holds a complete earlier save."""
    import multiprocessing
    import signal
    import time

    # forked from the fork server, which imports torch and resonant once (where it is not running
    # yet: resonant.parallel's runs preload as much), not a fresh interpreter per kill
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["resonant"])
    path = tmp_path / "memory.pt"
    for delay in (0.05, 0.3, 0.7, 1.2):
        ready = ctx.Event()
        proc = ctx.Process(target=_save_loop, args=(str(path), ready), daemon=True)
        proc.start()
        assert ready.wait(60)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        memory = SpatialMemory.load(path)
        # every save holds 1 + 2000 k entries whose values are 0 then 1..k
        assert (len(memory) - 1) % 2000 == 0
        k = (len(memory) - 1) // 2000
        assert memory.values[1:].reshape(k, 2000, 256)[:, 0, 0].tolist() == [float(i) for i in range(1, k + 1)]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["memory.pt"]


def test_save_replaces_a_previous_file_and_leaves_no_temporary(tmp_path):
    memory, *_ = random_memory(M=5)
    path = tmp_path / "m.pt"
    memory.save(path)
    memory.write(torch.zeros(1, 2, dtype=F64), 0.5, torch.zeros(1, 5, dtype=F64))
    memory.save(str(path))
    assert len(SpatialMemory.load(path)) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def _tampered(tmp_path, edit_config=None, edit_state=None):
    import json

    memory, *_ = random_memory(M=6, max_size=10)
    blob = dict(config=json.dumps(memory.config()), state=memory.state_dict())
    if edit_config:
        config = json.loads(blob["config"])
        edit_config(config)
        blob["config"] = json.dumps(config)
    if edit_state:
        edit_state(blob["state"])
    path = tmp_path / "bad.pt"
    torch.save(blob, path)
    return path


@pytest.mark.parametrize("edit_config, edit_state, message", [
    (lambda c: c.update(max_size=3), None, "holds 6 entries but the memory's max_size is 3"),
    (lambda c: c.update(max_size=0), None, "max_size must be an int >= 1"),
    (lambda c: c.update(backend="nonsense"), None, "unknown backend 'nonsense'"),
    (lambda c: c.update(location_dim=3), None, "location dimension 2 but the memory has location_dim 3"),
    (lambda c: c.pop("value_dim"), None, r"config is missing \['value_dim'\]"),
    (None, lambda s: s.update(next_id=torch.tensor(-4)), "next_id must be an int >= 6"),
    (None, lambda s: s.update(next_id=torch.tensor(2)), "next_id must be an int >= 6"),
    (None, lambda s: s.update(next_id=torch.tensor(7.5)), "next_id must be an int >= 6"),
    (None, lambda s: s.update(ids=torch.arange(6) - 3), "ids must be >= 0"),
    (None, lambda s: s.update(ids=torch.arange(6).flip(0)), "strictly increasing"),
    (None, lambda s: s.update(values=s["values"] * float("nan")), "^values contains NaN"),  # the state key
])
def test_load_rejects_inconsistent_files(tmp_path, edit_config, edit_state, message):
    path = _tampered(tmp_path, edit_config, edit_state)
    with pytest.raises((ValueError, KeyError), match=message):
        SpatialMemory.load(path)


def test_load_rejects_files_that_are_not_memories(tmp_path):
    for blob in ({"x": 1}, [1, 2], {"config": "{not json", "state": {}}, {"config": "{}", "state": {}}):
        path = tmp_path / "other.pt"
        torch.save(blob, path)
        with pytest.raises(ValueError, match="not a saved SpatialMemory|unreadable config"):
            SpatialMemory.load(path)


def test_constructor_rejects_an_unknown_or_unusable_backend():
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        SpatialMemory(2, 3, backend="nonsense")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run gaussian_read on cpu"):
        SpatialMemory(2, 3, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a string"):
        SpatialMemory(2, 3, backend=None)
    assert SpatialMemory(2, 3, backend="reference").backend == "reference"


def smooth_memory(M=300, seed=3):
    """Values that vary smoothly with location, so leave-one-out errors are small and prunes bite."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(M, 2, generator=gen, dtype=F64) * 3
    values = torch.stack([loc[:, 0].sin(), loc[:, 1].cos(), (loc[:, 0] * 0.3).tanh()], -1)
    memory = SpatialMemory(2, 3, dtype=F64)
    memory.write(loc, 0.3, values)
    return memory


def test_two_background_prunes_remove_what_sequential_prunes_remove():
    """Point 10: prunes are serialised, the second deciding on what the first left (one step
    each, so the second finds new candidates: two prunes of one snapshot would remove only the
    first step's)."""
    kw = dict(match_threshold=1.5, max_steps=1)
    sequential = smooth_memory()
    first, second = sequential.prune(0.05, **kw), sequential.prune(0.05, **kw)
    assert first > 0 and second > 0
    concurrent = smooth_memory()
    handles = [concurrent.prune(0.05, background=True, **kw) for _ in range(2)]
    assert sorted(h.wait(120) for h in handles) == sorted([first, second])
    assert concurrent.ids.tolist() == sequential.ids.tolist()
    # a foreground prune started while a background one runs waits for it
    third = smooth_memory()
    handle = third.prune(0.05, background=True, **kw)
    assert third.prune(0.05, **kw) + handle.wait(120) == first + second
    assert third.ids.tolist() == sequential.ids.tolist()
