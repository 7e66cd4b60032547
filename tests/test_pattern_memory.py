"""PatternMemory: recall maths against a direct reference, training, corruptions, bad input."""
import math
import threading

import pytest
import torch

import resonant
from resonant.hippocampus import PatternMemory
from resonant.hippocampus import patterns as patgen
from resonant.hippocampus.memory import kwta

F64 = torch.float64
BACKENDS = ("cpu", "reference")


# ---- a direct reference: loops and float64, no kernels ------------------------------------------

def reference_read(stored, cue, variance):
    """Σ_t softmax_t(−½ Σ_j (cue_j − x_tj)² / v_j) x_t, one cue, term by term."""
    logits = [-0.5 * sum((cue[j] - x[j]) ** 2 / variance[j] for j in range(len(cue))) for x in stored]
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = sum(weights)
    return [sum(w * x[j] for w, x in zip(weights, stored)) / total for j in range(len(cue))]


def reference_kwta(values, k, tie_order):
    rank = {unit: i for i, unit in enumerate(tie_order)}
    order = sorted(range(len(values)), key=lambda j: (-values[j], rank[j]))  # ties: earlier in tie_order wins
    winners = set(order[:k])
    return [1.0 if j in winners else 0.0 for j in range(len(values))]


def reference_recall(stored, cue, variance, activity, binary, steps, tie_order=None):
    state = list(cue)
    for _ in range(steps):
        read = reference_read(stored, state, variance)
        new = reference_kwta(read, activity, tie_order) if binary else read
        if all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8) for a, b in zip(new, state)):
            return new
        state = new
    return state


def reference_closest(stored, row):
    distances = [sum((a - b) ** 2 for a, b in zip(x, row)) for x in stored]
    best = min(distances)
    return distances.index(best)  # the first of equals


def binary_memory(n=7, units=24, active=6, seed=0, backend="auto", dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    stored = patgen.random_binary_patterns(n, units, active, generator=gen, dtype=dtype)
    memory = PatternMemory(units, backend=backend, dtype=dtype)
    memory.update(stored)
    return memory, stored, gen


def variance_of(memory):
    return (1.0 / (memory.inverse_temperature * memory.precisions)).tolist()


# ---- recall maths ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_unit", [False, True], ids=["shared_precision", "per_unit_precision"])
def test_binary_recall_matches_the_direct_reference(backend, per_unit):
    memory, stored, gen = binary_memory(backend=backend, seed=1)
    beta = 0.8  # soft enough that reads blend several patterns and recall takes several steps
    precisions = torch.rand(24, generator=gen, dtype=F64) * 1.5 + 0.25 if per_unit else None
    memory.set_parameters(inverse_temperature=beta, precisions=precisions)
    cues = patgen.switch_off_random(stored.repeat(3, 1), torch.tensor([0.3] * 7 + [0.6] * 7 + [0.9] * 7),
                                    generator=gen)
    got = memory.recall(cues, steps=6)
    variance = variance_of(memory)
    for cue, row in zip(cues.tolist(), got.tolist()):
        assert row == reference_recall(stored.tolist(), cue, variance, memory.activity, True, 6,
                                       memory.tie_order.tolist())
    assert got.sum(-1).eq(6).all()  # k-winners-take-all keeps the training set's activity


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_recall_matches_the_direct_reference(backend):
    gen = torch.Generator().manual_seed(3)
    stored = torch.randn(5, 9, generator=gen, dtype=F64) * 2
    memory = PatternMemory(9, backend=backend, dtype=F64)
    memory.update(stored)
    assert memory.binary is False and memory.activity is None
    memory.set_parameters(inverse_temperature=0.05, precisions=torch.rand(9, generator=gen, dtype=F64) + 0.5)
    cues = stored + torch.randn(5, 9, generator=gen, dtype=F64)
    for steps in (1, 3):
        got = memory.recall(cues, steps=steps)
        for cue, row in zip(cues.tolist(), got.tolist()):
            want = reference_recall(stored.tolist(), cue, variance_of(memory), 0, False, steps)
            assert row == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_one_read_is_gaussian_read_with_the_kernel_variance():
    memory, stored, gen = binary_memory(n=5, units=12, active=3)
    memory.set_parameters(inverse_temperature=2.0, precisions=torch.rand(12, generator=gen, dtype=F64) + 0.5)
    cues = torch.rand(4, 12, generator=gen, dtype=F64)
    v = 1.0 / (memory.inverse_temperature * memory.precisions)
    read = resonant.kernels.gaussian_read(cues, (v / 2).sqrt(), stored, (v / 2).sqrt(), stored, backend="reference")
    torch.testing.assert_close(memory.recall(cues, steps=1), kwta(read, 3, memory.tie_order))


@pytest.mark.parametrize("backend", BACKENDS)
def test_test_pattern_and_step_against_the_reference(backend):
    memory, stored, gen = binary_memory(n=9, units=30, active=8, backend=backend, seed=4)
    memory.set_parameters(inverse_temperature=1.5)
    cues = patgen.switch_off_first(stored, 0.75)
    result = memory.test_pattern(cues, stored)
    for i, (cue, target) in enumerate(zip(cues.tolist(), stored.tolist())):
        recalled = reference_recall(stored.tolist(), cue, variance_of(memory), 8, True, 10, memory.tie_order.tolist())
        assert result.recalled[i].tolist() == recalled
        assert int(result.distance[i]) == sum(a != b for a, b in zip(recalled, target))
        closest = reference_closest(stored.tolist(), recalled)
        assert int(result.closest_index[i]) == closest
        assert result.closest_pattern[i].tolist() == stored[closest].tolist()
    single = memory.test_pattern(cues[2], stored[2])
    assert single.recalled.shape == (30,) and single.distance.dim() == 0
    assert int(single.closest_index) == int(result.closest_index[2])
    rewards = memory.step(cues, stored, repeats=3)
    assert rewards.tolist() == (30 - result.distance).double().tolist()
    assert float(memory.step(cues[0], stored[0])) == 30 - int(result.distance[0])


def test_recall_stops_at_a_fixed_point_and_an_uncorrupted_pattern_is_one():
    memory, stored, _ = binary_memory(n=6, units=40, active=10)
    assert torch.equal(memory.recall(stored), stored)
    result = memory.test_pattern(stored, stored)
    assert result.distance.eq(0).all() and torch.equal(result.closest_index, torch.arange(6))


def test_closest_breaks_ties_by_the_lowest_index():
    memory = PatternMemory(4, dtype=F64)
    memory.update(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=F64))
    index, distance = memory.closest(torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=F64))
    assert index.tolist() == [0, 1, 0] and distance.tolist() == [2, 1, 2]


def test_kwta_breaks_ties_in_the_tie_order():
    x = torch.tensor([[0.5, 1.0, 0.5, 0.5, 0.2]])
    assert kwta(x, 3).tolist() == [[1, 1, 1, 0, 0]]  # unit order by default
    assert kwta(x, 3, torch.tensor([4, 3, 2, 1, 0])).tolist() == [[0, 1, 1, 1, 0]]
    assert kwta(x, 2, torch.tensor([2, 0, 1, 3, 4])).tolist() == [[0, 1, 1, 0, 0]]
    assert kwta(torch.tensor([0.1, 0.2]), 0).tolist() == [0, 0]
    order = PatternMemory(144).tie_order
    assert sorted(order.tolist()) == list(range(144)) and order.tolist() != list(range(144))
    assert torch.equal(order, PatternMemory(144).tie_order)  # fixed: recall is reproducible


# ---- corruptions -----------------------------------------------------------------------------------

def test_switch_off_first_removes_the_first_active_units_in_unit_order():
    x = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    assert patgen.switch_off_first(x, 0.5).tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert patgen.switch_off_first(x, torch.tensor([0.0, 0.8])).tolist() == [[0, 1, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0]]
    # the seed's experiment: int(36·r) of 36 active units, e.g. 32 at r = 0.9
    p = patgen.random_binary_patterns(50, 144, 36, generator=torch.Generator().manual_seed(0))
    for r in (0.0, 0.3, 0.9):
        cue = patgen.switch_off_first(p, r)
        assert cue.sum(-1).eq(36 - int(36 * r)).all() and (cue <= p).all()


def test_switch_off_random_draws_the_right_number_from_the_right_units():
    gen = torch.Generator().manual_seed(0)
    p = patgen.random_binary_patterns(200, 30, 10, generator=gen)
    cue = patgen.switch_off_random(p, 0.5, generator=gen)
    assert cue.sum(-1).eq(5).all() and (cue <= p).all()
    assert patgen.switch_off_random(p, 0.0, generator=gen).equal(p)
    assert patgen.switch_off_random(p, 1.0, generator=gen).sum() == 0
    # every active unit is equally likely to go
    hits = sum((p - patgen.switch_off_random(p, 0.5, generator=gen)).sum(0) for _ in range(20))
    per_unit = hits / (p.sum(0) * 20)
    assert per_unit.min() > 0.35 and per_unit.max() < 0.65
    real = torch.randn(40, 8, generator=gen) + 5
    assert (patgen.switch_off_random(real, 0.25, units="all", generator=gen) == 0).sum(-1).eq(2).all()
    with pytest.raises(ValueError, match="ratios"):
        patgen.switch_off_random(p, 1.5)
    with pytest.raises(ValueError, match="units"):
        patgen.switch_off_random(p, 0.5, units="some")


def test_random_binary_patterns_have_the_activity():
    p = patgen.random_binary_patterns(30, 144, 36, generator=torch.Generator().manual_seed(1))
    assert p.shape == (30, 144) and p.sum(-1).eq(36).all() and set(p.unique().tolist()) == {0.0, 1.0}


# ---- training ----------------------------------------------------------------------------------------

def clustered(clusters=5, variants=8, units=144, noise=0.1, seed=0):
    """Real-valued patterns in tight clusters: the width that tells siblings apart is far below
    the patterns' overall spread, which sets the untrained width."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(clusters, units, generator=gen)
    return (prototypes[:, None] + noise * torch.randn(clusters, variants, units, generator=gen)).reshape(-1, units)


def recall_rate(memory, stored, ratio, seed=1):
    cues = patgen.switch_off_random(stored, ratio, units="all", generator=torch.Generator().manual_seed(seed))
    hits = memory.test_pattern(cues, stored).closest_index == torch.arange(len(stored))
    return float(hits.double().mean())


@pytest.fixture
def one_thread():
    # the training tests' reads are tiny: OpenMP fork/join on a shared 2-core machine costs more than it saves
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_beats_the_untrained_width_on_clustered_patterns(one_thread):
    stored = clustered()
    memory = PatternMemory(144)
    memory.update(stored)
    untrained = [recall_rate(memory, stored, r) for r in (0.0, 0.1)]
    beta0 = memory.inverse_temperature
    seconds = memory.train(epochs=20, max_corruption=0.3, seed=0)
    trained = [recall_rate(memory, stored, r) for r in (0.0, 0.1)]
    assert seconds > 0 and memory.trained
    assert memory.inverse_temperature > 2 * beta0  # the fitted width is much narrower
    assert max(untrained) <= 0.2  # the untrained read returns the cluster's blend: 1 in 8 by chance
    assert min(trained) >= 0.9


def test_training_keeps_random_binary_recall_at_the_nearest_neighbour_level(one_thread):
    memory, stored, gen = binary_memory(n=20, units=144, active=36, dtype=torch.float32, seed=5)
    memory.train(epochs=5, seed=0)
    assert memory.trained and memory.precisions.shape == (144,)
    assert float(memory.precisions.log().mean()) == pytest.approx(0.0, abs=1e-5)
    cues = torch.cat([patgen.switch_off_first(stored, r) for r in (0.5, 0.8)])
    targets = torch.arange(20).repeat(2)
    assert torch.equal(memory.test_pattern(cues, stored[targets]).closest_index, targets)


def test_training_moves_the_per_unit_precisions_through_the_backward():
    memory, stored, _ = binary_memory(n=12, units=40, active=10, dtype=torch.float32, seed=2)
    memory.set_parameters(inverse_temperature=0.3)  # soft: the loss has gradients everywhere
    memory.train(epochs=3, seed=0)
    assert float(memory.precisions.log().std()) > 1e-4
    assert memory.inverse_temperature != pytest.approx(0.3)


def test_runs_keep_the_best_restart_and_are_reproducible(one_thread):
    stored = clustered(clusters=3, variants=4, units=16)
    a, b = PatternMemory(16), PatternMemory(16)
    for m in (a, b):
        m.update(stored)
        m.train(epochs=2, runs=3, copies=4, max_corruption=0.3, seed=7)
    assert a.inverse_temperature == b.inverse_temperature
    torch.testing.assert_close(a.precisions, b.precisions)


def test_update_resets_training_and_a_concurrent_update_wins_over_train():
    memory, stored, gen = binary_memory(n=10, units=32, active=8, dtype=torch.float32)
    memory.train(epochs=1, seed=0)
    assert memory.trained
    other = patgen.random_binary_patterns(4, 32, 8, generator=gen)
    memory.update(other)
    assert not memory.trained and torch.equal(memory.patterns, other)

    started, release = threading.Event(), threading.Event()
    original = memory._fit

    def slow_fit(*args, **kwargs):
        started.set()
        release.wait(10)
        return original(*args, **kwargs)

    memory._fit = slow_fit
    worker = threading.Thread(target=memory.train, kwargs=dict(epochs=1, seed=0))
    worker.start()
    started.wait(10)
    memory.update(stored)  # lands while train runs on the previous set
    release.set()
    worker.join(30)
    assert torch.equal(memory.patterns, stored) and not memory.trained


# ---- large d: per-unit precisions whose variance product leaves float range (issue #13's fix) -----

@pytest.mark.parametrize("backend", BACKENDS)
def test_large_per_unit_precisions_recall_like_the_reference(backend):
    memory, stored, gen = binary_memory(n=6, units=1024, active=256, backend=backend, dtype=torch.float32)
    # v_j ≈ 1 / (50 · p_j): the product of the 1024 variances is ~1e-1900, far below float range
    precisions = torch.rand(1024, generator=gen) * 2 + 0.1
    memory.set_parameters(inverse_temperature=50.0, precisions=precisions)
    cues = patgen.switch_off_first(stored, 0.9)
    assert torch.equal(memory.test_pattern(cues, stored).closest_index, torch.arange(6))
    # soft reads (binary=False: a recall step is the read itself) agree with the reference's
    reads = {}
    for name in (backend, "reference"):
        real = PatternMemory(1024, backend=name)
        real.update(stored, binary=False)
        real.set_parameters(inverse_temperature=0.05, precisions=precisions)
        reads[name] = real.recall(cues, steps=1)
    # float32 logits summed over 1024 units: agreement to ~1e-4 of the weights
    torch.testing.assert_close(reads[backend], reads["reference"], rtol=1e-3, atol=2e-4)
    assert float(reads["reference"].max()) < 0.999  # a blend, not one pattern


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    memory = PatternMemory(6)
    with pytest.raises(ValueError, match="no training set"):
        memory.recall(torch.zeros(6))
    with pytest.raises(ValueError, match="no training set"):
        memory.train()
    with pytest.raises(ValueError, match="patterns is empty"):
        memory.update(torch.zeros(0, 6))
    with pytest.raises(ValueError, match="patterns has 5 units"):
        memory.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="patterns contains NaN"):
        memory.update(torch.tensor([[0, 1, 0, 1, 0, float("nan")]]))
    with pytest.raises(ValueError, match="must be binary"):
        memory.update(torch.tensor([[0, 1, 0, 0.5, 0, 1]]), binary=True)
    with pytest.raises(ValueError, match="magnitude"):
        memory.update(torch.tensor([[0, 1, 0, 1e9, 0, 1]]))
    with pytest.raises(ValueError, match="patterns must be a tensor or a nested list"):
        memory.update([[0, 1], [1]])
    memory.update([[0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0]])
    assert memory.binary and memory.activity == 3
    with pytest.raises(ValueError, match="cues has 7 units"):
        memory.recall(torch.zeros(7))
    with pytest.raises(ValueError, match="cues must have shape"):
        memory.recall(torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        memory.recall(torch.zeros(6), steps=0)
    with pytest.raises(ValueError, match="corrupted has 2 rows but target has 3"):
        memory.test_pattern(torch.zeros(2, 6), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="target contains NaN"):
        memory.test_pattern(torch.zeros(6), torch.full((6,), float("inf")))
    with pytest.raises(ValueError, match="repeats"):
        memory.step(torch.zeros(6), torch.zeros(6), repeats=0)
    for kwargs, name in ((dict(epochs=0), "epochs"), (dict(runs=-1), "runs"), (dict(max_corruption=1.5), "max_corruption"),
                         (dict(lr=float("nan")), "lr"), (dict(copies=True), "copies")):
        with pytest.raises(ValueError, match=name):
            memory.train(**kwargs)
    with pytest.raises(ValueError, match="inverse_temperature"):
        memory.set_parameters(inverse_temperature=0.0)
    with pytest.raises(ValueError, match="precisions"):
        memory.set_parameters(precisions=torch.ones(5))
    with pytest.raises(ValueError, match="num_units"):
        PatternMemory(0)
    with pytest.raises(TypeError, match="dtype"):
        PatternMemory(4, dtype=torch.int64)
    assert torch.equal(memory.patterns, torch.tensor([[0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0]], dtype=torch.float32))


def test_binary_false_keeps_01_patterns_real_and_bool_input_works():
    memory = PatternMemory(4)
    memory.update(torch.tensor([[True, False, True, False], [False, True, False, True]]), binary=False)
    assert memory.binary is False and memory.activity is None
    assert memory.recall(torch.tensor([1.0, 0.0, 1.0, 0.0])).tolist() == pytest.approx([1, 0, 1, 0], abs=1e-3)


def test_public_api():
    assert resonant.PatternMemory is PatternMemory
    assert "PatternMemory" in repr(binary_memory()[0])
