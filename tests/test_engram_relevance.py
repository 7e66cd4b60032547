"""Per-dimension relevance (Scoring.relevance, LearnedRelevance, engram/relevance.py) and the
in-episode repeat avoidance (Exploration.avoid_repeats, EpisodeRepeats)."""
import math

import numpy as np
import pytest
import torch

from resonant.engram import EngramBrain, Exploration, LearnedRelevance, Outcomes, Scoring, TorchEngramStore
from resonant.engram.policy import EpisodeRepeats
from resonant.engram.relevance import fit_relevance, leave_one_out_loss


def one_hot_grid(n: int, seed: int = 0, noise: float = 0.3):
    """Engrams on two one-hot axes of 6 cells: the outcome depends on the first axis and the action,
    never on the second."""
    g = torch.Generator().manual_seed(seed)
    x, z, a = (torch.randint(0, k, (n,), generator=g) for k in (6, 6, 2))
    states = torch.cat([torch.nn.functional.one_hot(x, 6), torch.nn.functional.one_hot(z, 6)], 1).float()
    outcomes = x.float() / 5 + 0.3 * a.float() + noise * torch.randn(n, generator=g)
    return states, a, outcomes


# ---- Scoring.relevance ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ((), "relevance must hold"), ((1.0, -0.5), "relevance must hold"), ((0.0, 0.0), "relevance must hold"),
    ((1.0, math.nan), "relevance must hold"), ("ab", "relevance must be a sequence"), (3.0, "relevance must be"),
])
def test_scoring_rejects_bad_relevance(bad, match):
    with pytest.raises(ValueError, match=match):
        Scoring(relevance=bad)


def test_relevance_needs_kernel_weighted_scoring():
    with pytest.raises(ValueError, match="k=None"):
        Scoring(k=5, relevance=(1.0, 1.0))
    assert Scoring(relevance=np.array([1, 0.5])).relevance == (1.0, 0.5)


def test_relevance_scales_the_read_as_scaled_states_would():
    g = torch.Generator().manual_seed(1)
    states, queries = torch.randn(50, 3, generator=g), torch.randn(7, 3, generator=g)
    actions, outcomes = torch.randint(0, 2, (50,), generator=g), torch.randn(50, generator=g)
    r = torch.tensor([2.0, 0.0, 0.5])
    scaled_store, store = TorchEngramStore(3, 2), TorchEngramStore(3, 2)
    scaled_store.add(states * r, actions, outcomes)
    store.add(states, actions, outcomes)
    plain = Scoring(bandwidth=0.7, match_threshold=1.5)
    expected = scaled_store.action_values(queries * r, plain)
    got = store.action_values(queries, Scoring(bandwidth=0.7, match_threshold=1.5, relevance=tuple(r.tolist())))
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e)
    # and it changes the answer: without the factors the read is another one
    assert not torch.allclose(store.action_values(queries, plain)[0], got[0])
    with pytest.raises(ValueError, match="3 dimensions"):
        store.action_values(queries, Scoring(relevance=(1.0, 1.0)))


# ---- the leave-one-out fit -------------------------------------------------------------------------
def test_leave_one_out_loss_matches_a_loop_over_engrams():
    states, actions, outcomes = one_hot_grid(40, seed=2)
    rows = torch.tensor([0, 3, 7, 11, 39])
    r = torch.linspace(0.3, 2.0, 12)
    errors = []
    for i in rows.tolist():
        others = [j for j in range(40) if j != i and actions[j] == actions[i]]
        d2 = (((states[others] - states[i]) * r) ** 2).sum(1).double()
        w = torch.exp(-d2 / (2 * 0.5**2))
        errors.append(float((w @ outcomes[others].double()) / w.sum() - outcomes[i]) ** 2)
    loss = leave_one_out_loss(rows, states, actions, outcomes, r, 0.5)
    assert float(loss) == pytest.approx(np.mean(errors), rel=1e-4)


def test_fit_relevance_widens_the_dimensions_the_outcomes_do_not_depend_on():
    states, actions, outcomes = one_hot_grid(3000)
    settings = LearnedRelevance(steps=40, queries=256, memory=3000)
    r = fit_relevance(states, actions, outcomes, bandwidth=0.4, settings=settings, rng=np.random.default_rng(0))
    assert r.shape == (12,)
    relevant, irrelevant = r[:6], r[6:]
    assert float(irrelevant.max()) < 0.7 < 1.0 < float(relevant.min())  # all start at 1
    assert float(irrelevant.mean()) < 0.3
    assert float(r.min()) >= settings.floor and float(r.max()) <= settings.ceiling
    # and it lowers the error it minimises
    rows = torch.arange(3000)
    assert float(leave_one_out_loss(rows, states, actions, outcomes, r, 0.4)) < \
        float(leave_one_out_loss(rows, states, actions, outcomes, torch.ones(12), 0.4))


@pytest.mark.parametrize("bad, match", [
    ({"every": 0}, "every"), ({"steps": 1.5}, "steps"), ({"lr": -1.0}, "lr"), ({"floor": 0.0}, "floor"),
    ({"floor": 2.0, "ceiling": 1.0}, "floor must be below ceiling"),
])
def test_learned_relevance_rejects_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        LearnedRelevance(**bad)


def test_brain_refits_relevance_every_so_many_episodes():
    states, actions, outcomes = one_hot_grid(600, seed=3, noise=0.0)
    brain = EngramBrain(TorchEngramStore(12, 2), scoring=Scoring(bandwidth=0.4, match_threshold=1.0),
                        relevance=LearnedRelevance(every=3, steps=30, memory=600), seed=0)
    for episode in range(3):
        rows = slice(200 * episode, 200 * (episode + 1))
        assert brain.scoring.relevance is None
        brain.store.add(states[rows], actions[rows], outcomes[rows])
        brain.remember(states[rows][:1], actions[rows][:1], [0.0])
    brain.action_scores(states[:1])  # the decision after the third episode refits
    r = np.array(brain.scoring.relevance)
    assert r.shape == (12,) and r[6:].max() < r[:6].min()
    fitted = brain.scoring.relevance
    brain.action_scores(states[:1])
    assert brain.scoring.relevance == fitted  # not again until `every` more episodes


def test_learned_relevance_needs_the_torch_store_kernel_read():
    with pytest.raises(ValueError, match="TorchEngramStore with kernel-weighted scoring"):
        EngramBrain(TorchEngramStore(2, 2), scoring=Scoring(k=3), relevance=LearnedRelevance())
    with pytest.raises(TypeError, match="LearnedRelevance"):
        EngramBrain(TorchEngramStore(2, 2), relevance=3)


# ---- avoid_repeats -------------------------------------------------------------------------------
def test_episode_repeats_scores_taken_actions_below_untaken_ones():
    repeats = EpisodeRepeats()
    obs, other = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    scores = np.array([0.9, 0.5, 0.1, 0.7])
    np.testing.assert_array_equal(repeats.scores(obs, scores), scores)
    repeats.record(obs, 0)
    repeats.record(obs, 3)
    masked = repeats.scores(obs, scores)
    assert np.argsort(-masked).tolist() == [1, 2, 0, 3]  # untaken by score, then taken by score
    np.testing.assert_array_equal(repeats.scores(other, scores), scores)  # per observation
    for a in (1, 2):
        repeats.record(obs, a)
    np.testing.assert_array_equal(repeats.scores(obs, scores), scores)  # all taken: the scores decide again
    repeats.reset()
    np.testing.assert_array_equal(repeats.scores(obs, scores), scores)


def test_exploration_rejects_a_non_bool_avoid_repeats():
    with pytest.raises(ValueError, match="avoid_repeats"):
        Exploration(avoid_repeats=1)


def test_decide_with_repeats_leaves_a_greedy_loop():
    # one engram says action 0 is best everywhere: a greedy agent pushes against SubGridWorld's border
    from resonant.sim import SubGridWorld

    store = TorchEngramStore(36, 6)
    brain = EngramBrain(store, scoring=Scoring(bandwidth=100.0, match_threshold=math.inf, prior=0.0),
                        exploration=Exploration(epsilon_start=0.0, epsilon_end=0.0, avoid_repeats=True), seed=0)
    store.add(torch.zeros(1, 36), torch.tensor([0]), torch.tensor([1.0]))
    for avoid in (False, True):
        env = SubGridWorld(max_steps=60)
        obs, _ = env.reset(seed=0)
        repeats = [EpisodeRepeats()] if avoid else None
        seen, repeated_while_untaken = {}, 0
        positions = set()
        for _ in range(60):
            action = int(brain.decide(obs[None, :], repeats=repeats)[0])
            taken = seen.setdefault(obs.tobytes(), set())
            repeated_while_untaken += action in taken and len(taken) < 6
            taken.add(action)
            obs, _, terminated, truncated, info = env.step(action)
            positions.add(tuple(info["position"]))
            if terminated or truncated:
                break
        if avoid:
            assert repeated_while_untaken == 0 and len(positions) > 12
        else:
            assert repeated_while_untaken > 40 and len(positions) <= 12  # stuck at the +x border


def test_a_due_refit_waits_for_the_next_decision_when_a_truncated_episode_is_written():
    # the asynchronous writer remembers a batch of episodes into a collecting stand-in for the
    # store; a truncated episode bootstraps from the memory there and must not refit on the way
    from resonant.parallel.server import collected_writes

    states, actions, outcomes = one_hot_grid(200, seed=4, noise=0.0)
    brain = EngramBrain(TorchEngramStore(12, 2), scoring=Scoring(bandwidth=0.4, match_threshold=1.0),
                        relevance=LearnedRelevance(every=1, steps=5), seed=0)
    brain.store.add(states, actions, outcomes)
    brain.remember(states[:2], actions[:2], [0.0, 1.0])  # a refit is now due
    with collected_writes(brain):
        brain.remember(states[2:5], actions[2:5], [0.0, 0.0, 0.0], final_state=states[5], terminated=False)
    assert brain.scoring.relevance is None and len(brain.store) == 205
    brain.action_scores(states[:1])
    assert brain.scoring.relevance is not None
