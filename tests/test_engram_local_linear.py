"""estimator="local_linear": action scores from a local linear fit inside one fused read."""
import numpy as np
import pytest
import torch

try:
    import milvus_lite  # noqa: F401
    import pymilvus  # noqa: F401
    MILVUS = None
except ImportError as exc:  # the `milvus` extra is optional
    MILVUS = f"pymilvus / milvus-lite not installed: {exc}"

from resonant.engram import EngramBrain, Exploration, Scoring, TorchEngramStore
from resonant.engram import scoring


def kernel_weights(q, states, bandwidth, threshold):
    """gaussian_read's normalised weights (query and memory sd bandwidth/√2 each, so v = bandwidth²)."""
    d2 = ((q[None, :] - states) ** 2).sum(1)
    logk = np.where(d2 > threshold**2, -np.inf, -0.5 * d2 / bandwidth**2)
    if not np.isfinite(logk).any():
        return np.zeros(len(states))
    w = np.exp(logk - logk.max())
    return w / w.sum()


def weighted_least_squares(q, states, actions, outcomes, w, num_actions, ridge, bandwidth):
    """Per-action intercepts c and shared slope β minimising Σ w (o − c[a] − βᵀ(s − q))² + λ‖β‖²,
    λ = ridge · bandwidth² · Σw, solved directly from the design matrix (float64)."""
    x = np.concatenate([np.eye(num_actions)[actions], states - q], axis=1)
    penalty = np.zeros(x.shape[1])
    penalty[num_actions:] = ridge * bandwidth**2 * w.sum()
    used = np.bincount(actions, weights=w, minlength=num_actions) > 0
    penalty[:num_actions][~used] = 1.0  # an action without evidence: its intercept is unconstrained
    lhs = x.T @ (w[:, None] * x) + np.diag(penalty)
    return np.linalg.solve(lhs, x.T @ (w * outcomes))[:num_actions], used


def random_store(n, d, num_actions, seed, **kw):
    g = np.random.default_rng(seed)
    states = g.normal(size=(n, d)).astype(np.float32)
    actions = g.integers(0, num_actions, n)
    outcomes = (states @ g.normal(size=d) * 3 + g.normal(size=n)).astype(np.float32)
    store = TorchEngramStore(d, num_actions, seed=0, **kw)
    store.add(states, actions, outcomes, 0.0)
    return store


def reference_scores(store, queries, bandwidth, ridge, recency_halflife=None):
    e = store.engrams()
    states, actions, outcomes = (e["states"].double().numpy(), e["actions"].numpy(), e["outcomes"].double().numpy())
    age = (store._next_index - 1 - e["index"].numpy()).astype(np.float64)
    recency = 2.0 ** (-age / recency_halflife) if recency_halflife else np.ones(len(age))
    scores, evidence = [], []
    for q in queries.astype(np.float64):
        w = kernel_weights(q, states, bandwidth, 3 * bandwidth) * recency
        evidence.append(np.bincount(actions, weights=w, minlength=store.num_actions))
        if w.sum() == 0:
            scores.append(np.full(store.num_actions, np.nan))
            continue
        c, used = weighted_least_squares(q, states, actions, outcomes, w, store.num_actions, ridge, bandwidth)
        scores.append(np.where(used, c, np.nan))
    return np.array(scores), np.array(evidence)


def store_scores(store, queries, bandwidth, ridge, **kw):
    sums, evidence = store.action_values(torch.as_tensor(queries), Scoring(k=None, bandwidth=bandwidth,
                                                                           estimator="local_linear", ridge=ridge, **kw))
    scores = torch.where(evidence > 0, sums / evidence.clamp_min(1e-30), torch.nan)
    return scores.numpy(), evidence.numpy()


@pytest.mark.parametrize("d,num_actions,n", [(1, 2, 40), (3, 4, 173), (8, 3, 300)])
@pytest.mark.parametrize("recency_halflife", [None, 50.0])
def test_local_linear_scores_are_the_weighted_least_squares_fit(d, num_actions, n, recency_halflife):
    store = random_store(n, d, num_actions, seed=d)
    g = np.random.default_rng(100 + d)
    queries = np.concatenate([g.normal(size=(6, d)), np.full((1, d), 40.0)]).astype(np.float32)  # last: no evidence
    bandwidth, ridge = (0.7 if d < 8 else 1.3), 0.2  # bandwidth ≠ 1 so the ridge's bandwidth² scale is tested
    ref_scores, ref_evidence = reference_scores(store, queries, bandwidth, ridge, recency_halflife)
    scores, evidence = store_scores(store, queries, bandwidth, ridge, recency_halflife=recency_halflife)
    np.testing.assert_allclose(evidence, ref_evidence, rtol=1e-4, atol=1e-6)
    assert evidence[-1].sum() == 0
    has = ref_evidence > 1e-3  # actions with a sliver of evidence have ill-determined intercepts
    assert has.sum() > 10
    np.testing.assert_allclose(scores[has], ref_scores[has], rtol=2e-3, atol=2e-3)


def test_local_linear_recovers_action_values_where_the_mean_is_biased():
    # outcome = c[a] + 10·x0: action 0 (c = 1) was taken on the high side of the query, action 1
    # (c = 2, the better one) on the low side, so the plain mean prefers the wrong action
    g = np.random.default_rng(0)
    n = 400
    states = g.normal(scale=0.3, size=(n, 2)).astype(np.float32)
    actions = np.where(states[:, 0] > 0, 0, 1)
    outcomes = (np.array([1.0, 2.0])[actions] + 10 * states[:, 0]).astype(np.float32)
    store = TorchEngramStore(2, 2, seed=0)
    store.add(states, actions, outcomes, 0.0)
    q = np.zeros((1, 2), np.float32)
    greedy = Exploration(epsilon_start=0.0)
    plain = EngramBrain(store, scoring=Scoring(bandwidth=0.5), exploration=greedy)
    fitted = EngramBrain(store, scoring=Scoring(bandwidth=0.5, estimator="local_linear", ridge=1e-6),
                         exploration=greedy)
    assert plain.decide(q).tolist() == [0]
    assert fitted.decide(q).tolist() == [1]
    scores, _ = fitted.action_scores(q)
    np.testing.assert_allclose(scores[0].numpy(), [1.0, 2.0], atol=1e-3)
    moved = np.array([[0.2, -0.1]], np.float32)
    np.testing.assert_allclose(fitted.action_scores(moved)[0][0].numpy(), [3.0, 4.0], atol=1e-3)


def test_local_linear_columns_follow_inserts_and_evictions():
    d, num_actions = 3, 3
    store = random_store(30, d, num_actions, seed=1, capacity=50)
    q = np.random.default_rng(2).normal(size=(5, d)).astype(np.float32)
    store_scores(store, q, 1.0, 0.01)  # widens the stored value columns
    g = np.random.default_rng(3)
    store.add(g.normal(size=(40, d)).astype(np.float32), g.integers(0, num_actions, 40),
              g.normal(size=40).astype(np.float32), 0.0)  # evicts the 20 oldest
    assert len(store) == 50
    fresh = TorchEngramStore(d, num_actions)
    e = store.engrams()
    fresh.add(e["states"], e["actions"], e["outcomes"], 0.0)
    np.testing.assert_allclose(store_scores(store, q, 1.0, 0.01)[0], store_scores(fresh, q, 1.0, 0.01)[0],
                               rtol=1e-4, atol=1e-4)
    # the plain mean reads the first columns of the widened table
    for s in (store, fresh):
        s.mean = s.action_values(torch.as_tensor(q), Scoring(k=None, bandwidth=1.0))
    for got, want in zip(store.mean, fresh.mean):
        torch.testing.assert_close(got, want)


def test_read_columns_layout():
    states = torch.tensor([[1.0, 2.0]])
    cols = scoring.read_columns(states, torch.tensor([1]), torch.tensor([3.0]), 2)
    assert cols.shape[1] == scoring.column_count(2, 2, "local_linear") == 2 * 4 + 3 + 2
    assert scoring.column_count(2, 2, "mean") == 4  # the mean reads the first 2A: e·o, e
    expected = [0, 3, 0, 1, 0, 0, 1, 2, 1, 2, 4, 3, 6]  # e·o, e, e⊗s, (s0², s0·s1, s1²), s·o
    assert cols[0].tolist() == expected


def test_local_linear_bad_configurations_raise():
    # checked once, when the options are built, for every store
    with pytest.raises(ValueError, match="estimator"):
        Scoring(k=None, bandwidth=1.0, estimator="median")
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="ridge"):
            Scoring(k=None, bandwidth=1.0, estimator="local_linear", ridge=bad)
    with pytest.raises(ValueError, match="outcome_temperature"):
        Scoring(k=None, bandwidth=1.0, estimator="local_linear", outcome_temperature=5.0)
    with pytest.raises(ValueError, match="bandwidth"):
        Scoring(k=4, bandwidth=None, estimator="local_linear")


def knn_reference_scores(store, queries, k, bandwidth, ridge):
    """The fit over each query's k nearest engrams, Gaussian-weighted relative to the nearest."""
    e = store.engrams()
    states, actions, outcomes = (e["states"].double().numpy(), e["actions"].numpy(), e["outcomes"].double().numpy())
    scores = []
    for q in queries.astype(np.float64):
        d2 = ((states - q) ** 2).sum(1)
        near = np.argsort(d2, kind="stable")[:k]
        w = np.exp(-(d2[near] - d2[near].min()) / (2 * bandwidth**2))
        c, used = weighted_least_squares(q, states[near], actions[near], outcomes[near], w, store.num_actions, ridge,
                                         bandwidth)
        scores.append(np.where(used, c, np.nan))
    return np.array(scores)


@pytest.mark.parametrize("d,num_actions,k", [(2, 3, 25), (5, 4, 60)])
def test_local_linear_over_k_nearest_is_the_weighted_least_squares_fit(d, num_actions, k):
    store = random_store(150, d, num_actions, seed=5)
    queries = np.random.default_rng(6).normal(size=(5, d)).astype(np.float32)
    sums, evidence = store.action_values(torch.as_tensor(queries), Scoring(k=k, bandwidth=0.8, estimator="local_linear",
                                                                           ridge=0.2))
    ref = knn_reference_scores(store, queries, k, 0.8, 0.2)
    share = (evidence / evidence.sum(1, keepdim=True)).numpy()
    has = share > 1e-3
    assert has.sum() >= 10
    np.testing.assert_allclose((sums / evidence.clamp_min(1e-30)).numpy()[has], ref[has], rtol=2e-3, atol=2e-3)


def test_local_linear_over_every_engram_matches_the_kernel_read():
    # k = all engrams and a threshold wide enough to keep them all: the same weights up to a constant
    store = random_store(60, 3, 2, seed=8)
    q = torch.as_tensor(np.random.default_rng(9).normal(scale=0.3, size=(4, 3)).astype(np.float32))
    kernel = store.action_values(q, Scoring(k=None, bandwidth=1.5, match_threshold=1e3, estimator="local_linear"))
    knn = store.action_values(q, Scoring(k=60, bandwidth=1.5, estimator="local_linear"))
    torch.testing.assert_close(kernel[0] / kernel[1], knn[0] / knn[1], rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(MILVUS is not None, reason=str(MILVUS))
def test_milvus_local_linear_matches_the_torch_store(tmp_path):
    from resonant.engram.milvus_store import MilvusEngramStore

    g = np.random.default_rng(10)
    states = g.normal(size=(120, 3)).astype(np.float32)
    actions, outcomes = g.integers(0, 3, 120), g.normal(size=120).astype(np.float32)
    torch_store = TorchEngramStore(3, 3)
    torch_store.add(states, actions, outcomes, 0.0)
    with MilvusEngramStore(3, 3, str(tmp_path / "ll.db")) as milvus:
        milvus.add(states, actions, outcomes, 0.0)
        q = torch.as_tensor(g.normal(size=(4, 3)).astype(np.float32))
        knn = Scoring(k=30, bandwidth=0.7, estimator="local_linear")
        a, b = torch_store.action_values(q, knn), milvus.action_values(q, knn)
        nb = milvus.search(q, 30, with_states=True)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[0], b[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(nb.state[0, 0].numpy(), states[nb.index[0, 0].item()], rtol=1e-6)
