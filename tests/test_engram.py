"""EngramStore (torch, Milvus Lite), EngramBrain and Trainer: small, fast cases."""
import math

import numpy as np
import pytest
import torch

from resonant.engram import EngramBrain, Exploration, Outcomes, Scoring, TorchEngramStore
from resonant.engram.brain import discounted_returns, n_step_targets
from resonant.engram.eviction import choose_evictions

try:
    from resonant.engram.milvus_store import MilvusEngramStore

    import milvus_lite  # noqa: F401
    import pymilvus  # noqa: F401
    MILVUS = None
except ImportError as exc:  # the `milvus` extra is optional; torch-store tests still run
    MILVUS = f"pymilvus / milvus-lite not installed: {exc}"
needs_milvus = pytest.mark.skipif(MILVUS is not None, reason=str(MILVUS))

D, A = 5, 3


def random_engrams(n, seed=0, d=D):
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, d)).astype(np.float32), g.integers(0, A, n), g.normal(size=n).astype(np.float32),
            g.normal(size=n).astype(np.float32))


def make_store(kind, tmp_path, **kw):
    if kind == "torch":
        return TorchEngramStore(D, A, seed=0, **kw)
    return MilvusEngramStore(D, A, str(tmp_path / "engrams.db"), seed=0, **kw)


@pytest.fixture(params=["torch", pytest.param("milvus", marks=needs_milvus)])
def kind(request):
    return request.param


@needs_milvus
def test_torch_and_milvus_flat_return_same_neighbours(tmp_path):
    states, actions, outcomes, returns = random_engrams(257)
    queries = np.random.default_rng(1).normal(size=(7, D)).astype(np.float32)
    t = make_store("torch", tmp_path)
    t.add(states, actions, outcomes, returns)
    with make_store("milvus", tmp_path, index_type="FLAT", insert_batch=100) as m:
        m.add(states, actions, outcomes, returns)
        a, b = t.search(queries, 10), m.search(queries, 10)
    assert torch.equal(a.index, b.index)
    assert torch.equal(a.action, b.action)
    torch.testing.assert_close(a.outcome, b.outcome)
    torch.testing.assert_close(a.distance, b.distance, rtol=1e-4, atol=1e-4)
    # exact: brute force agrees
    brute = np.argsort(((queries[:, None] - states[None]) ** 2).sum(-1), axis=1)[:, :10]
    assert np.array_equal(a.index.numpy(), brute)


def test_search_pads_when_memory_is_smaller_than_k(kind, tmp_path):
    states, actions, outcomes, returns = random_engrams(3)
    with make_store(kind, tmp_path) as s:
        s.add(states, actions, outcomes, returns)
        nb = s.search(states[:2], 5)
    assert nb.valid.sum(1).tolist() == [3, 3]
    assert (nb.index[:, 3:] == -1).all() and torch.isinf(nb.distance[:, 3:]).all()
    assert nb.index[:, 0].tolist() == [0, 1]  # each state finds itself first


@needs_milvus
def test_milvus_reopen_keeps_every_engram(tmp_path):
    states, actions, outcomes, returns = random_engrams(120, seed=3)
    path = str(tmp_path / "persist.db")
    with MilvusEngramStore(D, A, path, insert_batch=50) as s:
        s.add(states[:70], actions[:70], outcomes[:70], returns[:70])
        s.add(states[70:], actions[70:], outcomes[70:], returns[70:])
        before = s.search(states[:4], 6)
    with MilvusEngramStore(D, A, path) as s:
        assert len(s) == 120
        after = s.search(states[:4], 6)
        s.add(states[:1], actions[:1], outcomes[:1], returns[:1])
        assert s.search(states[:1], 2).index[0].tolist() in ([0, 120], [120, 0])  # ids continue after reopen
    assert torch.equal(before.index, after.index)
    torch.testing.assert_close(before.outcome, after.outcome)
    with pytest.raises(ValueError, match="state_dim"):
        MilvusEngramStore(D + 1, A, path)


def test_torch_save_load_round_trip(tmp_path):
    states, actions, outcomes, returns = random_engrams(50, seed=4)
    s = TorchEngramStore(D, A, capacity=40, eviction="smallest")
    s.add(states, actions, outcomes, returns)
    s.save(tmp_path / "store.pt")
    r = TorchEngramStore.load(tmp_path / "store.pt")
    assert len(r) == 40 and r.capacity == 40 and r.eviction == "smallest"
    a, b = s.search(states[:5], 7), r.search(states[:5], 7)
    assert torch.equal(a.index, b.index) and torch.equal(a.action, b.action)
    r.add(states[:1], actions[:1], outcomes[:1], returns[:1])
    assert int(r.engrams()["index"].max()) == 40  # indices continue after load (the 10 oldest were never stored)


@pytest.mark.parametrize("policy", ["oldest", "random", "smallest"])
def test_eviction_keeps_capacity_and_follows_policy(kind, tmp_path, policy):
    states, actions, outcomes, returns = random_engrams(30, seed=5)
    with make_store(kind, tmp_path, capacity=12, eviction=policy) as s:
        for start in range(0, 30, 7):
            s.add(states[start:start + 7], actions[start:start + 7], outcomes[start:start + 7],
                  returns[start:start + 7])
            assert len(s) <= 12
        assert len(s) == 12
        kept = sorted(s.search(states, 12).index[0].tolist())
    if policy == "oldest":
        assert kept == list(range(18, 30))
    elif policy == "smallest":
        # batches arrive 7 at a time; replay the rule to know which survive
        ids, outs = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for start in range(0, 30, 7):
            new = np.arange(start, min(30, start + 7))
            over = len(ids) + len(new) - 12
            if over > 0:
                drop = choose_evictions(over, "smallest", ids, outs, np.random.default_rng(0))
                ids, outs = np.delete(ids, drop), np.delete(outs, drop)
            ids, outs = np.concatenate([ids, new]), np.concatenate([outs, outcomes[new]])
        assert kept == sorted(ids.tolist())
        assert kept != list(range(18, 30))  # differs from "oldest" on this data
    else:
        assert len(set(kept)) == 12 and all(0 <= i < 30 for i in kept)
        assert 29 in kept  # the newest batch is inserted after eviction


def test_choose_evictions_rules():
    idx = np.array([5, 1, 9, 3])
    out = np.array([0.5, -0.1, 0.1, 2.0])
    assert choose_evictions(2, "oldest", idx, out, None).tolist() == [1, 3]
    assert choose_evictions(2, "smallest", idx, out, None).tolist() == [1, 2]  # |−0.1| ties 0.1: older first
    r = choose_evictions(3, "random", idx, out, np.random.default_rng(0))
    assert len(set(r.tolist())) == 3


@pytest.mark.parametrize("bad, match", [
    (dict(states=np.zeros((2, D + 1), np.float32)), "states must have shape"),
    (dict(states=np.array([[np.nan] * D, [0.0] * D], np.float32)), "states contains NaN"),
    (dict(actions=np.array([0, A])), r"actions must lie in \[0, 3\)"),
    (dict(actions=np.array([-1, 0])), "actions must lie"),
    (dict(actions=np.array([0.0, 1.0])), "actions must be integers"),
    (dict(outcomes=np.array([0.0, np.inf])), "outcomes contains Inf"),
    (dict(outcomes=np.zeros(3)), "outcomes has 3 entries but states has 2"),
])
def test_bad_input_raises_and_stores_nothing(kind, tmp_path, bad, match):
    args = dict(states=np.zeros((2, D), np.float32), actions=np.array([0, 1]), outcomes=np.zeros(2),
                episode_returns=np.zeros(2))
    args.update(bad)
    with make_store(kind, tmp_path, capacity=1) as s:
        s.add(np.ones((1, D), np.float32), [2], [1.0], 1.0)
        with pytest.raises((ValueError, TypeError), match=match):
            s.add(**args)
        assert len(s) == 1
        assert s.search(np.ones(D, np.float32), 1).action.item() == 2  # the old engram was not evicted


@needs_milvus
def test_store_config_errors(tmp_path):
    with pytest.raises(ValueError, match="eviction"):
        TorchEngramStore(D, A, eviction="lru")
    with pytest.raises(ValueError, match="capacity"):
        TorchEngramStore(D, A, capacity=0)
    with pytest.raises(ValueError, match="index_type"):
        MilvusEngramStore(D, A, str(tmp_path / "x.db"), index_type="DISKANN")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        TorchEngramStore(D, A).search(np.zeros(D), 0)


@needs_milvus
@pytest.mark.parametrize("index_type", ["IVF_FLAT", "HNSW"])
def test_milvus_approximate_indexes_find_exact_matches(tmp_path, index_type):
    states, actions, outcomes, returns = random_engrams(200, seed=6)
    with MilvusEngramStore(D, A, str(tmp_path / "a.db"), index_type=index_type) as s:
        s.add(states, actions, outcomes, returns)
        nb = s.search(states[:10], 3)
    assert nb.index[:, 0].tolist() == list(range(10))
    assert torch.allclose(nb.distance[:, 0], torch.zeros(10), atol=1e-3)


def kernel_action_values_reference(query, states, actions, outcomes, bandwidth, threshold):
    d2 = ((query[:, None] - states[None]) ** 2).sum(-1)
    logw = -d2 / (2 * bandwidth**2)
    logw = np.where(np.sqrt(d2) > threshold, -np.inf, logw)
    w = np.exp(logw - np.where(np.isfinite(logw).any(1, keepdims=True), logw.max(1, keepdims=True), 0))
    w = np.where(np.isfinite(logw), w, 0)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)
    onehot = np.eye(A)[actions]
    return w @ (onehot * outcomes[:, None]), w @ onehot


def test_torch_kernel_scoring_is_one_fused_read_matching_reference():
    states, actions, outcomes, returns = random_engrams(97, seed=7)
    s = TorchEngramStore(D, A)
    s.add(states, actions, outcomes, returns)
    q = np.concatenate([states[:5] + 0.1, np.full((1, D), 50.0, np.float32)])  # last query matches nothing
    sums, evidence = s.action_values(torch.as_tensor(q), Scoring(k=None, bandwidth=0.8))
    ref_sums, ref_evidence = kernel_action_values_reference(q.astype(np.float64), states.astype(np.float64),
                                                            actions, outcomes.astype(np.float64), 0.8, 2.4)
    np.testing.assert_allclose(sums.numpy(), ref_sums, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(evidence.numpy(), ref_evidence, rtol=1e-4, atol=1e-5)
    assert evidence[-1].sum() == 0


GREEDY = Exploration(epsilon_start=0.0)


def brain_with(engrams, **scoring):
    s = TorchEngramStore(2, A)
    states, actions, outcomes = engrams
    s.add(np.asarray(states, np.float32), actions, outcomes, 0.0)
    return EngramBrain(s, scoring=Scoring(**scoring), exploration=GREEDY, seed=0)


@pytest.mark.parametrize("k", [None, 4])
def test_brain_prefers_best_action_and_uses_explicit_prior(k):
    engrams = ([[0, 0], [0, 0.1], [0.1, 0], [0, 0]], [0, 0, 1, 1], [1.0, 3.0, -1.0, -3.0])
    brain = brain_with(engrams, k=k, bandwidth=1.0, prior=-10.0)
    scores, share = brain.action_scores(np.zeros((1, 2), np.float32))
    assert scores[0, 2].item() == -10.0 and share[0, 2].item() == 0.0  # no evidence -> the prior
    assert 1.5 < scores[0, 0].item() < 2.5 and -2.5 < scores[0, 1].item() < -1.5
    assert brain.decide(np.zeros((3, 2), np.float32)).tolist() == [0, 0, 0]
    optimistic = brain_with(engrams, k=k, bandwidth=1.0, prior=10.0)
    assert optimistic.decide(np.zeros(2, np.float32)).tolist() == [2]
    neighbourhood = brain_with(engrams, k=k, bandwidth=1.0, prior="neighbourhood")
    s, _ = neighbourhood.action_scores(np.zeros((1, 2), np.float32))
    assert abs(s[0, 2].item()) < 0.5  # the mean of all local evidence, about 0 here


def test_brain_empty_memory_reads_empty_prior():
    brain = EngramBrain(TorchEngramStore(2, A), scoring=Scoring(prior="neighbourhood", empty_prior=-7.0),
                        exploration=GREEDY)
    scores, _ = brain.action_scores(np.zeros((2, 2), np.float32))
    assert torch.equal(scores, torch.full((2, A), -7.0))


def test_brain_remember_stores_discounted_returns_and_decays_epsilon():
    store = TorchEngramStore(2, A)
    brain = EngramBrain(store, outcomes=Outcomes(gamma=0.5),
                        exploration=Exploration(epsilon_start=1.0, epsilon_decay=0.5, epsilon_end=0.3))
    assert brain.remember(np.zeros((3, 2)), [0, 1, 2], [1.0, 2.0, 4.0]) == 3
    assert store.engrams()["outcomes"].tolist() == [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0]
    assert store.engrams()["episode_returns"].tolist() == [7.0] * 3
    assert brain.epsilon == 0.5
    brain.remember(np.zeros((1, 2)), [0], [0.0])
    assert brain.epsilon == 0.3  # clamped at epsilon_end


def test_brain_bad_input_raises_and_stores_nothing():
    store = TorchEngramStore(2, A)
    brain = EngramBrain(store)
    assert (brain.state_dim, brain.num_actions) == (2, A)  # the store's
    with pytest.raises(ValueError, match="states must have shape"):
        brain.decide(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="states contains NaN"):
        brain.decide(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="actions must lie"):
        brain.remember(np.zeros((2, 2)), [0, 5], [1.0, 1.0])
    with pytest.raises(ValueError, match="rewards contains NaN"):
        brain.remember(np.zeros((2, 2)), [0, 1], [1.0, math.nan])
    with pytest.raises(TypeError, match="store must be an EngramStore"):
        EngramBrain(None)
    with pytest.raises(TypeError, match="scoring must be a Scoring"):
        EngramBrain(store, scoring={"k": 3})
    assert len(store) == 0


@pytest.mark.parametrize("group, bad, match", [
    (Scoring, dict(k=0), "k must be a positive integer or None"),
    (Scoring, dict(k=2.5), "k must be"),
    (Scoring, dict(bandwidth=0.0), "bandwidth must be a positive number or None"),
    (Scoring, dict(k=None, bandwidth=None), r"kernel-weighted scoring \(k=None\) needs a positive bandwidth"),
    (Scoring, dict(match_threshold=0.0), "match_threshold must be a positive number"),
    (Scoring, dict(match_threshold=float("nan")), "match_threshold"),
    (Scoring, dict(prior="optimistic"), "prior must be a number or 'neighbourhood'"),
    (Scoring, dict(prior=float("nan")), "prior"),
    (Scoring, dict(empty_prior="0"), "empty_prior must be a number"),
    (Scoring, dict(min_evidence=1.5), r"min_evidence must lie in \[0, 1\]"),
    (Outcomes, dict(gamma=1.5), r"gamma must lie in \[0, 1\]"),
    (Outcomes, dict(n_step=0), "n_step must be a positive integer or None"),
    (Exploration, dict(epsilon_decay=-0.1), "epsilon_decay must lie in"),
    (Exploration, dict(epsilon_start=2.0), "epsilon_start must lie in"),
])
def test_options_are_checked_when_built(group, bad, match):
    with pytest.raises(ValueError, match=match):
        group(**bad)


def test_options_are_frozen_and_work_with_any_store_the_same_way():
    import dataclasses
    import inspect

    from resonant.engram import EngramStore

    with pytest.raises(dataclasses.FrozenInstanceError):
        Scoring().k = 5  # type: ignore[misc]
    assert Scoring(k=3, bandwidth=None).bandwidth is None  # uniform weights over the 3 nearest
    assert Scoring(match_threshold=math.inf).match_threshold == math.inf  # no threshold
    stores = [EngramStore, TorchEngramStore] + ([MilvusEngramStore] if MILVUS is None else [])
    signatures = {str(inspect.signature(s.action_values)) for s in stores}
    assert signatures == {"(self, states: 'ArrayLike', scoring: 'Scoring') -> 'tuple[torch.Tensor, torch.Tensor]'"}


def test_n_step_targets_match_direct_sum():
    g = np.random.default_rng(0)
    rewards, values, gamma = g.normal(size=9), g.normal(size=10), 0.9
    for n in (1, 3, 20):
        direct = []
        for t in range(9):
            stop = min(t + n, 9)
            direct.append(sum(gamma ** (i - t) * rewards[i] for i in range(t, stop)) + gamma ** (stop - t) * values[stop])
        np.testing.assert_allclose(n_step_targets(rewards, values, gamma, n), direct)
    np.testing.assert_allclose(discounted_returns(rewards, gamma, values[-1]),
                               n_step_targets(rewards, values, gamma, 100))


def test_trainer_runs_and_writes_report(tmp_path):
    from resonant.trainer import Trainer

    pytest.importorskip("gymnasium")
    brain = EngramBrain(TorchEngramStore(4, 2), scoring=Scoring(bandwidth=0.5), outcomes=Outcomes(n_step=5), seed=0)
    trainer = Trainer(brain, "CartPole-v1", num_envs=3, seed=0, normalise_episodes=4)
    result = trainer.train(10, progress=False)
    trainer.close()
    assert len(result.episode_returns) == 10
    assert len(brain.store) == sum(result.episode_lengths)  # every step of every episode remembered
    with pytest.raises(ValueError, match="action_repeat"):
        Trainer(brain, "CartPole-v1", action_repeat=0)
    summary = trainer.write_report(tmp_path, "cartpole")
    assert summary["episodes"] == 10 and (tmp_path / "cartpole.png").stat().st_size > 1000
    import json

    assert json.loads((tmp_path / "cartpole.json").read_text())["episode_returns"] == result.episode_returns


def test_cli_store_specs():
    import argparse

    from resonant.train_cli import parse_store

    assert parse_store("torch") == ("torch", None)
    assert parse_store("milvus-lite:/tmp/x.db") == ("milvus", "/tmp/x.db")
    assert parse_store("milvus:http://h:19530") == ("milvus", "http://h:19530")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_store("faiss")


def test_trainer_action_repeat_makes_one_engram_per_decision():
    from resonant.trainer import Trainer

    brain = EngramBrain(TorchEngramStore(4, 2), scoring=Scoring(bandwidth=0.5), seed=0)
    trainer = Trainer(brain, "CartPole-v1", num_envs=2, seed=0, normalise_episodes=2, action_repeat=3)
    result = trainer.train(6, progress=False)
    trainer.close()
    decisions = sum(-(-n // 3) for n in result.episode_lengths)  # ceil: the last decision may be cut short
    assert len(brain.store) == decisions < sum(result.episode_lengths)
    assert abs(sum(result.episode_returns) - sum(result.episode_lengths)) < 1e-9  # CartPole pays 1 per step


@needs_milvus
def test_brain_scores_agree_between_torch_and_milvus_stores(tmp_path):
    states, actions, outcomes, returns = random_engrams(150, seed=8)
    queries = np.random.default_rng(2).normal(size=(6, D)).astype(np.float32)
    t = TorchEngramStore(D, A)
    t.add(states, actions, outcomes, returns)
    with MilvusEngramStore(D, A, str(tmp_path / "b.db")) as m:
        m.add(states, actions, outcomes, returns)
        knn = Scoring(k=12, bandwidth=0.7, prior=-5.0)
        got = EngramBrain(m, scoring=knn).action_scores(queries)
    want = EngramBrain(t, scoring=knn).action_scores(queries)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs k"):
        EngramBrain(m, scoring=Scoring(k=None)).action_scores(queries)


def one_state_history(outcomes_in_order, actions=None):
    """A 1-d memory whose engrams all sit at the origin, stored oldest first."""
    n = len(outcomes_in_order)
    store = TorchEngramStore(1, 2)
    store.add(np.zeros((n, 1), np.float32), np.zeros(n, np.int64) if actions is None else actions,
              np.asarray(outcomes_in_order, np.float32), 0.0)
    return store


@pytest.mark.parametrize("k", [None, 6])
def test_recency_halflife_weighs_engrams_by_age(k):
    outcomes = [-8.0, -4.0, 0.0, 2.0, 4.0, 6.0]  # oldest first
    store = one_state_history(outcomes)
    q = torch.zeros(1, 1)
    ages = np.arange(len(outcomes))[::-1]  # the newest has age 0
    for halflife in (2.5, 1.0):  # 1.0 last, so the read after the insert below reuses its key
        sums, evidence = store.action_values(q, Scoring(k=k, bandwidth=1.0, recency_halflife=halflife))
        w = 2.0 ** (-ages / halflife)
        assert sums[0, 0].item() / evidence[0, 0].item() == pytest.approx(w @ outcomes / w.sum(), rel=1e-5)
    sums, evidence = store.action_values(q, Scoring(k=k, bandwidth=1.0))
    assert sums[0, 0].item() / evidence[0, 0].item() == pytest.approx(np.mean(outcomes), rel=1e-5)
    # a new engram makes every other one older: the cached weights must follow
    store.add(np.zeros((1, 1), np.float32), [0], [100.0], 0.0)
    sums, evidence = store.action_values(q, Scoring(k=k and k + 1, bandwidth=1.0, recency_halflife=1.0))
    w = 2.0 ** (-np.arange(7)[::-1] / 1.0)
    assert sums[0, 0].item() / evidence[0, 0].item() == pytest.approx(w @ (outcomes + [100.0]) / w.sum(), rel=1e-5)


def test_brain_recency_halflife_follows_the_newer_outcomes():
    # action 0 was good long ago and is bad now; action 1 was always middling
    actions = np.array([0] * 20 + [1] * 10 + [0] * 5)
    outcomes = [5.0] * 20 + [1.0] * 10 + [-5.0] * 5
    s = one_state_history(outcomes, actions)
    plain = EngramBrain(s, scoring=Scoring(bandwidth=1.0), exploration=GREEDY)
    recent = EngramBrain(s, scoring=Scoring(bandwidth=1.0, recency_halflife=3.0), exploration=GREEDY)
    assert plain.decide(np.zeros(1, np.float32)).tolist() == [0]  # mean of action 0 is 3
    assert recent.decide(np.zeros(1, np.float32)).tolist() == [1]
    for bad in (0, -1.0, math.nan, math.inf, True, "3"):
        with pytest.raises(ValueError, match="recency_halflife"):
            Scoring(k=None, bandwidth=1.0, recency_halflife=bad)


@pytest.mark.parametrize("k", [None, 8])
def test_outcome_temperature_scores_a_soft_maximum(k):
    outcomes = np.array([-3.0, 0.0, 1.0, 2.0, -40.0, 5.0, 4.0, -1.0])
    store = one_state_history(outcomes)
    q = torch.zeros(1, 1)

    def score(**kw):
        sums, evidence = store.action_values(q, Scoring(k=k, bandwidth=1.0, **kw))
        # the tilt leaves the evidence alone
        assert evidence[0, 0].item() == pytest.approx(1.0 if k is None else 8.0, rel=1e-5)
        return sums[0, 0].item() / evidence[0, 0].item()

    for temperature in (0.5, 2.0, 10.0):
        t = np.exp((outcomes - outcomes.max()) / temperature)
        assert score(outcome_temperature=temperature) == pytest.approx(t @ outcomes / t.sum(), rel=1e-4)
    assert score(outcome_temperature=1e-3) == pytest.approx(5.0, rel=1e-4)  # towards the max
    assert score(outcome_temperature=1e6) == pytest.approx(outcomes.mean(), rel=1e-3)  # towards the mean
    # an outcome 400 temperatures below the best still counts (floored, not underflowed to nothing)
    lone = one_state_history([-4000.0, 0.0], actions=np.array([1, 0]))
    sums, evidence = lone.action_values(q, Scoring(k=k and 2, bandwidth=1.0, outcome_temperature=10.0))
    assert evidence[0, 1].item() > 0 and sums[0, 1].item() / evidence[0, 1].item() == pytest.approx(-4000.0, rel=1e-5)
    with pytest.raises(ValueError, match="outcome_temperature"):
        Scoring(k=k, bandwidth=1.0, outcome_temperature=0.0)


def test_cli_defaults_are_the_chosen_lunarlander_configuration():
    # BENCHMARKS.md (EngramBrain) names these as the `resonant train` defaults
    from resonant.cli import build_parser

    args = build_parser().parse_args(["train", "lunarlander"])
    chosen = {"bandwidth": 0.3, "gamma": 0.96, "action_repeat": 4, "capacity": 200_000, "epsilon_decay": 0.99,
              "epsilon_end": 0.0, "recency_halflife": None, "outcome_temperature": None, "k": None, "n_step": None,
              "estimator": None, "ridge": 0.01}  # estimator None: local_linear unless --outcome-temperature
    assert {key: getattr(args, key) for key in chosen} == chosen
    args = build_parser().parse_args(["train", "lunarlander", "--recency-halflife", "5000", "--outcome-temperature",
                                      "30", "--epsilon-end", "0.05"])
    assert (args.recency_halflife, args.outcome_temperature, args.epsilon_end) == (5000.0, 30.0, 0.05)


def test_cli_train_passes_the_options_to_the_brain(tmp_path, monkeypatch):
    pytest.importorskip("gymnasium")
    import resonant.engram
    from resonant.cli import main

    built = {}

    class RecordingBrain(EngramBrain):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built["brain"] = self

    monkeypatch.setattr(resonant.engram, "EngramBrain", RecordingBrain)
    assert main(["train", "cartpole", "--episodes", "3", "--recency-halflife", "50", "--outcome-temperature", "7",
                 "--epsilon-end", "0.1", "--out", str(tmp_path), "--name", "run", "--no-progress"]) == 0
    brain = built["brain"]
    assert (brain.scoring.recency_halflife, brain.scoring.outcome_temperature) == (50.0, 7.0)
    assert brain.exploration.epsilon_end == 0.1
    assert brain.scoring.estimator == "mean"  # the outcome tilt is not a weighted sum a local fit can use
    assert (tmp_path / "run.json").exists()
    assert main(["train", "cartpole", "--episodes", "2", "--ridge", "0.5", "--out", str(tmp_path), "--name", "ll",
                 "--no-progress"]) == 0
    assert (built["brain"].scoring.estimator, built["brain"].scoring.ridge) == ("local_linear", 0.5)
    assert main(["train", "cartpole", "--episodes", "2", "--k", "5", "--out", str(tmp_path), "--name", "knn",
                 "--no-progress"]) == 0
    assert (built["brain"].scoring.estimator, built["brain"].scoring.k) == ("local_linear", 5)


# ---- hardening (issue #13 point 9): remember() checks the episode before anything changes ----

@pytest.mark.parametrize("n_step", [None, 3])
@pytest.mark.parametrize("states, actions, rewards, message", [
    (np.zeros((0, 2)), [], [], r"empty episode \(states has 0 rows\)"),
    (np.zeros((4, 2)), [0, 1, 2, 0], [1.0, 2.0, 3.0], "rewards has 3 entries but states has 4"),
    (np.zeros((3, 2)), [0, 1], [1.0, 1.0, 1.0], "actions has 2 entries but states has 3"),
    (np.zeros((3, 2)), [0, 1, 2], [1e38, 1e38, 1e38], r"rewards: .* reach 3e\+38, beyond ±1e\+30"),
    (np.zeros((2, 2)), [0, 1], [float("nan"), 0.0], "rewards contains NaN"),
    (np.zeros((2, 3)), [0, 1], [1.0, 1.0], r"states must have shape \(N, 2\)"),
])
def test_remember_rejects_bad_episodes_naming_the_argument(n_step, states, actions, rewards, message):
    store = TorchEngramStore(2, 3)
    brain = EngramBrain(store, outcomes=Outcomes(n_step=n_step))
    with pytest.raises(ValueError, match=message):
        brain.remember(states, actions, rewards)
    assert len(store) == 0 and brain.epsilon == 1.0


def test_remember_accepts_large_finite_rewards_within_the_limit():
    store = TorchEngramStore(2, 3)
    brain = EngramBrain(store, outcomes=Outcomes(n_step=2))
    assert brain.remember(np.zeros((3, 2)), [0, 1, 2], [1e29, 1e29, 1e29]) == 3
    scores, _ = brain.action_scores(np.zeros((1, 2)))
    assert torch.isfinite(scores).all()


def test_torch_store_checks_its_memory_once_per_version_and_every_query(monkeypatch):
    from resonant.engram import torch_store
    checked = []  # the memory checks that read the values (gaussian_read's own, with validate=False, do not)
    real = torch_store.kernel_checks.memory

    def spy(*args, **kwargs):
        if kwargs.get("validate") is not False:
            checked.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch_store.kernel_checks, "memory", spy)
    store = TorchEngramStore(D, A)
    store.add(*random_engrams(50))
    scoring = Scoring(k=None, bandwidth=0.8)
    q = torch.zeros(3, D)
    store.action_values(q, scoring)
    store.action_values(q, scoring)
    assert len(checked) == 1  # decisions between writes read a memory already checked
    store.action_values(q, Scoring(k=None, bandwidth=0.5))
    assert len(checked) == 2  # another scoring, another check
    store.add(*random_engrams(5, seed=1))
    store.action_values(q, scoring)
    assert len(checked) == 3  # a write: checked again
    with pytest.raises(ValueError, match="query_loc has a value of magnitude .* above the usable bound"):
        store.action_values(torch.full((1, D), 1e19), scoring)  # the queries at every call


def test_torch_store_memory_beyond_the_usable_range_raises_at_every_read():
    store = TorchEngramStore(D, A)
    states, actions, outcomes, returns = random_engrams(20)
    states[3, 0] = 1e19  # finite (add accepts it) but beyond what the kernels compute in float32
    store.add(states, actions, outcomes, returns)
    for _ in range(2):  # a failed check is not remembered
        with pytest.raises(ValueError, match="mem_loc has a value of magnitude .* above the usable bound"):
            store.action_values(torch.zeros(1, D), Scoring(k=None, bandwidth=0.8))
