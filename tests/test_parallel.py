"""The asynchronous trainer (resonant.parallel), the policy options and SubGridWorld.

Reliability tests run real worker processes on tiny environments (tests/parallel_envs.py); every
run is bounded by max_seconds, and the Ctrl-C test by subprocess timeouts, so a hang fails the
test instead of blocking the suite.
"""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")

import parallel_envs  # noqa: E402,F401  (registers Chain-v0)
from resonant.engram import EngramBrain, Exploration, Outcomes, Scoring, TorchEngramStore  # noqa: E402
from resonant.engram.brain import discounted_returns  # noqa: E402
from resonant.engram.policy import glow_credit, select_actions, softmax_probabilities  # noqa: E402
from resonant.parallel import AsyncTrainer, MemoryServer, WorkerFailed  # noqa: E402
from resonant.parallel import local as local_engine  # noqa: E402
from resonant.parallel.local import SPIN_WAIT_SECONDS, usable_cores  # noqa: E402
from resonant.parallel.stats import LatencyHistogram  # noqa: E402
from resonant.parallel.worker import Episode  # noqa: E402
from resonant.sim import SubGridWorld  # noqa: E402

TESTS = Path(__file__).parent
CHAIN = "parallel_envs:Chain-v0"
RUN_LIMIT = 120.0  # seconds: a run that has not finished by then stops, and its test fails


# ---- glow credit and the softmax policy ----------------------------------------------------
def glow_by_definition(rewards, discount, states, actions):
    keys = [(tuple(s), a) for s, a in zip(states, actions)]
    out = []
    for t in range(len(rewards)):
        stop = next((u for u in range(t + 1, len(rewards)) if keys[u] == keys[t]), len(rewards))
        out.append(sum(discount ** (u - t) * rewards[u] for u in range(t, stop)))
    return np.array(out)


def test_glow_credit_cuts_at_a_repeated_state_action_pair():
    states = np.array([[0.0], [1.0], [0.0], [2.0]], dtype=np.float32)
    np.testing.assert_allclose(glow_credit([0, 0, 0, 1], 0.9, states, [0, 1, 0, 1]), [0.0, 0.81, 0.9, 1.0])
    np.testing.assert_allclose(glow_credit([1, 0, 0, 1], 0.9, states, [0, 1, 0, 1]), [1.0, 0.81, 0.9, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(20):
        T = int(rng.integers(1, 30))
        s = rng.integers(0, 3, size=(T, 2)).astype(np.float32)
        a = rng.integers(0, 2, size=T)
        r = rng.normal(size=T)
        np.testing.assert_allclose(glow_credit(r, 0.8, s, a), glow_by_definition(r, 0.8, s, a), atol=1e-12)


def test_glow_credit_is_the_discounted_return_when_nothing_repeats():
    rng = np.random.default_rng(1)
    r = rng.normal(size=50)
    states = rng.normal(size=(50, 8)).astype(np.float32)
    np.testing.assert_allclose(glow_credit(r, 0.9, states, rng.integers(0, 4, 50), tail_value=2.0),
                               discounted_returns(r, 0.9, 2.0))


def test_brain_stores_glow_credit_as_outcomes():
    brain = EngramBrain(TorchEngramStore(1, 2), scoring=Scoring(bandwidth=0.5),
                        outcomes=Outcomes(gamma=0.9, credit="glow"))
    brain.remember([[0.0], [1.0], [0.0], [2.0]], [0, 1, 0, 1], [0, 0, 0, 1])
    np.testing.assert_allclose(brain.store.engrams()["outcomes"].numpy(), [0.0, 0.81, 0.9, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="credit"):
        Outcomes(credit="trace")
    with pytest.raises(ValueError, match="n_step"):
        Outcomes(credit="glow", n_step=3)


def test_epsilon_greedy_draws_are_those_decide_always_made():
    def before(scores, rng, epsilon):  # EngramBrain.decide's selection before the policy options
        noise = rng.random(scores.shape) * 1e-6 * (1.0 + np.abs(scores))
        actions = np.argmax(scores + noise, axis=1).astype(np.int64)
        if epsilon > 0:
            mask = rng.random(len(actions)) < epsilon
            actions[mask] = rng.integers(0, scores.shape[1], int(mask.sum()))
        return actions

    scores = np.random.default_rng(3).integers(-2, 3, size=(500, 4)).astype(np.float32) * 50  # many ties
    for epsilon in (0.0, 0.3):
        got = select_actions(scores, np.random.default_rng(7), epsilon=epsilon)
        np.testing.assert_array_equal(got, before(scores, np.random.default_rng(7), epsilon))
    # one row at a time from one generator, as a worker chooses: rows that do not explore draw no
    # random action, and the stream stays the one the batched form draws from
    for epsilon in (0.0, 0.1, 0.9):
        ours, theirs = np.random.default_rng(11), np.random.default_rng(11)
        got = [select_actions(row[None], ours, epsilon=epsilon)[0] for row in scores]
        np.testing.assert_array_equal(got, [before(row[None], theirs, epsilon)[0] for row in scores])
        assert ours.random() == theirs.random()


def test_softmax_policy_samples_exp_beta_score():
    scores = np.array([[0.0, 1.0, 2.0, -1.0]])
    probs = softmax_probabilities(scores, 1.5)[0]
    draws = select_actions(np.repeat(scores, 40_000, axis=0), np.random.default_rng(0), policy="softmax", beta=1.5)
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.01)
    greedy = select_actions(scores, np.random.default_rng(0), policy="softmax", beta=1.5, explore=False)
    assert greedy.tolist() == [2]
    # through the brain: outcome 1 for action 0 and 0 for action 1 at the same state
    brain = EngramBrain(TorchEngramStore(1, 2), scoring=Scoring(bandwidth=0.5),
                        exploration=Exploration(policy="softmax", beta=2.0), seed=0)
    brain.store.add([[0.0], [0.0]], [0, 1], [1.0, 0.0])
    freq0 = (brain.decide(np.zeros((4000, 1))) == 0).mean()
    assert freq0 == pytest.approx(np.exp(2.0) / (np.exp(2.0) + 1.0), abs=0.03)
    for bad in (dict(policy="boltzmann"), dict(policy="softmax", beta=0.0), dict(beta=float("nan"))):
        with pytest.raises(ValueError, match="policy|beta"):
            Exploration(**bad)


# ---- SubGridWorld ------------------------------------------------------------------------
def test_subgridworld_passes_check_env_and_is_registered():
    from gymnasium.utils.env_checker import check_env

    import resonant.sim

    env = gym.make(resonant.sim.SUBGRID_ENV_ID)
    check_env(env.unwrapped)
    assert env.unwrapped.max_steps == 400
    assert env.observation_space.shape == (36,) and env.action_space.n == 6
    obs, info = env.reset(seed=0)
    assert obs.sum() == 3 and all(obs[12 * a:12 * (a + 1)].sum() == 1 for a in range(3))
    assert np.argmax(obs[:12]) == info["position"][0]


def test_subgridworld_goal_moves_and_reward():
    env = SubGridWorld()
    for seed in range(30):
        _, info = env.reset(seed=seed)
        goal, start = info["goal"], info["position"]
        assert goal[0] == 6 and goal[1] == 11 and goal[2] == start[2]  # in the plane the agent started in
        assert not np.array_equal(goal, start)
    env.reset(seed=1)
    env.position[:] = (6, 10, 4)
    env.goal[:] = (6, 11, 4)
    obs, reward, terminated, truncated, _ = env.step(4)  # +z: off the plane, no reward
    assert (reward, terminated) == (0.0, False) and env.position.tolist() == [6, 10, 5]
    env.step(5)
    obs, reward, terminated, _, info = env.step(2)  # +y reaches the goal
    assert (reward, terminated) == (1.0, True) and info["shortest_path"] == 0
    env.position[:] = (0, 0, 0)
    env.step(1)  # −x into the border: stays
    assert env.position.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="action"):
        env.step(6)


def test_subgridworld_caps_episodes_at_400_steps():
    env = gym.make("resonant/SubGridWorld-v0", cap_reward=-1.0)
    env.reset(seed=0)
    env.unwrapped.position[:] = (0, 0, 0)
    env.unwrapped.goal[:] = (6, 11, 11)  # unreachable by moving along x alone
    rewards = []
    for step in range(400):
        _, r, terminated, truncated, _ = env.step(step % 2)  # +x, −x, …
        rewards.append(r)
        assert not terminated
    assert truncated and rewards[-1] == -1.0 and sum(rewards[:-1]) == 0.0


@pytest.mark.parametrize("bad, match", [
    (dict(grid_size=1), "grid_size"), (dict(plane=(0, 0)), "plane"), (dict(plane=(0, 3)), "plane"),
    (dict(goal=(6, 12)), "goal"), (dict(render_mode="human"), "render_mode"), (dict(max_steps=0), "max_steps"),
])
def test_subgridworld_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        SubGridWorld(**bad)


# ---- the memory server -------------------------------------------------------------------
class CountingStore(TorchEngramStore):
    adds = 0

    def add(self, *args, **kwargs):
        self.adds += 1
        return super().add(*args, **kwargs)


def chain_episode(worker, index, length, rng):
    states = rng.normal(size=(length, 2)).astype(np.float32)
    return Episode(worker=worker, index=index, states=states, actions=rng.integers(0, 2, length),
                   rewards=rng.normal(size=length), final_state=states[-1], terminated=True, env_steps=length,
                   latencies=np.full(length, 1e-4))


def test_memory_server_holds_episodes_for_the_normaliser_then_writes_each_batch_with_one_add():
    brain = EngramBrain(CountingStore(2, 2), scoring=Scoring(bandwidth=0.5))
    server = MemoryServer([brain], [0, 0], normalise_episodes=3)
    rng = np.random.default_rng(0)
    episodes = [chain_episode(i % 2, i // 2, 4 + i, rng) for i in range(5)]
    for e in episodes[:2]:
        server.submit(e)
    assert server.decide([0, 1], np.zeros((2, 2))).tolist() == [[0, 0], [0, 0]]  # random play: equal scores
    assert len(brain.store) == 0 and brain.normalise is None
    for e in episodes[2:]:
        server.submit(e)
    server.flush()
    assert brain.normalise is not None and brain.store.adds == 1  # all five episodes, one write
    assert len(brain.store) == sum(e.decisions for e in episodes) == server.engrams_written[0]
    stored = brain.store.engrams()
    raw = stored["states"] * brain.normalise.std + brain.normalise.mean
    want = np.concatenate([e.states for e in episodes])
    np.testing.assert_allclose(raw.numpy(), want, atol=1e-5)  # every step once, in order
    assert server.decide([1], np.zeros((1, 2))).shape == (1, 2)


def test_memory_server_final_flush_stores_episodes_still_waiting_for_the_normaliser():
    brain = EngramBrain(TorchEngramStore(2, 2), scoring=Scoring(bandwidth=0.5))
    server = MemoryServer([brain], [0], normalise_episodes=10)
    server.submit(chain_episode(0, 0, 6, np.random.default_rng(1)))
    server.flush()
    assert len(brain.store) == 0
    server.flush(final=True)
    assert len(brain.store) == 6


def test_latency_histogram_quantiles():
    h = LatencyHistogram()
    h.add(np.concatenate([np.full(98, 1e-3), [0.5, 2.0]]))
    assert h.count == 100 and h.mean() == pytest.approx((0.098 + 2.5) / 100)
    assert 1e-3 <= h.quantile(0.5) <= 1.07e-3
    assert 0.5 <= h.quantile(0.99) <= 0.54


def test_all_playing_rate_stops_at_the_first_workers_last_episode(monkeypatch):
    from resonant.parallel.stats import AllPlayingRate, RunStats

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    stats = RunStats(2, all_playing=AllPlayingRate(episodes_per_worker=2))

    def at(t, batch=None, episode=None):
        now[0] = t
        if batch is not None:
            stats.record_batch(batch, np.zeros(batch))
        if episode is not None:
            worker, index = episode
            e = chain_episode(worker, index, 3, np.random.default_rng(index))
            stats.record_episode(e)

    at(10.0, batch=2)  # the first answer starts the clock
    at(11.0, batch=2)
    at(12.0, batch=2, episode=(0, 0))  # not a last episode: both still play
    at(13.0, batch=2)
    at(13.5, episode=(1, 1))  # worker 1's last (its budget is 2): from here on one worker asks
    at(14.0, batch=1)
    at(15.0, batch=1)
    summary = stats.summary()
    assert summary["all_playing_decisions_per_s"] == pytest.approx(6 / 3.0)  # the answers at 11, 12, 13
    assert summary["answering_seconds"] == pytest.approx(5.0)


# ---- the local engine ----------------------------------------------------------------------
def chain_brain():
    return EngramBrain(TorchEngramStore(2, 2), scoring=Scoring(bandwidth=0.5),
                       exploration=Exploration(epsilon_decay=0.9))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_until_gone(pids, seconds: float = 10.0) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def collect_run(trainer, **kwargs):
    episodes = []
    try:
        trainer.train(progress=False, on_episode=episodes.append, **kwargs)
    finally:
        assert not wait_until_gone(trainer.stats.worker_pids), "worker processes outlived the run"
    return episodes


@pytest.mark.parametrize("memory, workers_per_process, predictor_workers, spin_wait",
                         [("shared", 1, 0, 0.0), ("isolated", 1, 0, None), ("shared", 2, 0, None),
                          ("shared", 1, 1, 0.0), ("isolated", 1, 3, None),
                          # polling pipes: one process and the predictor, and three processes on fewer cores
                          ("shared", 2, 1, 0.005), ("isolated", 1, 0, 0.005)])
def test_every_step_of_every_worker_becomes_exactly_one_engram(memory, workers_per_process, predictor_workers,
                                                               spin_wait):
    # predictor_workers: the first workers are stepped by the predictor's own process (3: all of them)
    trainer = AsyncTrainer(chain_brain, CHAIN, num_workers=3, episodes_per_worker=7, memory=memory,
                           normalise_episodes=2, max_seconds=RUN_LIMIT, seed=5, workers_per_process=workers_per_process,
                           predictor_workers=predictor_workers, spin_wait=spin_wait)
    episodes = collect_run(trainer)
    stats = trainer.stats
    assert stats.stop_reason == "finished"
    assert {w: len(r) for w, r in stats.returns.items()} == {0: 7, 1: 7, 2: 7}
    sizes = trainer.server.memory_sizes()
    if memory == "shared":
        assert sizes == [sum(e.decisions for e in episodes)] == [stats.total_decisions]
    else:
        assert sizes == [sum(e.decisions for e in episodes if e.worker == w) for w in range(3)]
    # the stored engrams are the workers' steps: same actions and episode returns, as multisets
    stored = [b.store.engrams() for b in trainer.server.brains]
    got = sorted(zip(torch.cat([s["actions"] for s in stored]).tolist(),
                     np.round(torch.cat([s["episode_returns"] for s in stored]).numpy(), 5).tolist()))
    want = sorted((int(a), round(e.total_reward, 5)) for e in episodes for a in e.actions)
    assert got == want
    summary = stats.summary()
    assert summary["mean_predictor_batch"] >= 1 and summary["decision_latency_ms"]["count"] == stats.total_decisions
    assert 0 < summary["answering_seconds"] <= summary["wall_seconds"] and summary["steady_decisions_per_s"] > 0
    assert 0 < summary["predictor_busy_share"] < 1.05  # answering time split into the predictor's work and its waits
    # each worker's episodes start from the seeded resets, whatever the timing
    assert sorted(e.index for e in episodes if e.worker == 1) == list(range(7))
    # workers 0 and 1 share a process with workers_per_process=2; the predictor's own need none
    assert len(stats.worker_pids) == -(-(3 - predictor_workers) // workers_per_process)
    if workers_per_process > 1 or predictor_workers > 1:  # several workers post their decisions together
        assert max(stats.batch_sizes) >= 2
    # the rate while all three played: from the first answer until the first worker's last episode
    assert 0 < summary["all_playing_decisions_per_s"]
    processes = len(stats.worker_pids)
    fits = processes + 1 <= usable_cores()
    expected_spin = spin_wait if spin_wait is not None else (SPIN_WAIT_SECONDS if fits else 0.0)
    assert summary["spin_wait_seconds"] == expected_spin


def test_spin_wait_polls_only_where_the_processes_fit_the_cores(monkeypatch):
    assert 1 <= local_engine.usable_cores() <= (os.cpu_count() or 1)
    monkeypatch.setattr(local_engine, "usable_cores", lambda: 2)
    assert local_engine.spin_seconds(None, 1) == SPIN_WAIT_SECONDS > 0  # one worker process and the predictor
    assert local_engine.spin_seconds(None, 2) == 0.0
    assert local_engine.spin_seconds(None, 0) == SPIN_WAIT_SECONDS
    monkeypatch.setattr(local_engine, "usable_cores", lambda: 16)
    assert local_engine.spin_seconds(None, 8) == SPIN_WAIT_SECONDS
    assert local_engine.spin_seconds(0.0, 1) == 0.0 and local_engine.spin_seconds(0.25, 40) == 0.25  # as given


def test_wait_ready_polls_then_blocks_for_the_rest_of_the_timeout():
    import threading

    reader, writer = multiprocessing.Pipe(duplex=False)
    try:
        t0 = time.monotonic()
        assert local_engine.wait_ready([reader], 0.3, 0.05) == []  # nothing came: the whole timeout
        assert 0.29 <= time.monotonic() - t0 < 5
        writer.send_bytes(b"x")
        assert local_engine.wait_ready([reader], 5.0, 0.05) == [reader]  # at once
        reader.recv_bytes()
        # a message that comes after the polling is over wakes the blocked wait
        later = threading.Timer(0.2, writer.send_bytes, args=(b"y",))
        later.start()
        t0 = time.monotonic()
        assert local_engine.wait_ready([reader], 10.0, 0.01) == [reader] and time.monotonic() - t0 < 5
        later.join()
        assert local_engine.wait_ready([reader], 0.0, 0.05) == [reader]  # a zero timeout still looks once
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("memory", ["shared", "isolated"])
def test_a_decision_sees_every_episode_that_finished_before_it(memory):
    brains = [EngramBrain(TorchEngramStore(2, 2), scoring=Scoring(bandwidth=0.5))
              for _ in range(1 if memory == "shared" else 2)]
    server = MemoryServer(brains, [0, 0] if memory == "shared" else [0, 1], normalise_episodes=0)
    episode = chain_episode(0, 0, 5, np.random.default_rng(2))
    episode.rewards[:] = 10.0
    server.submit(episode)  # worker 0 finishes an episode …
    scores = server.decide([1], episode.states[:1])  # … and worker 1 asks at a state worker 0 saw
    if memory == "shared":
        assert scores.max() > 5.0  # worker 0's outcomes answer worker 1
    else:
        assert scores.tolist() == [[0.0, 0.0]] and len(brains[0].store) == 5


def test_episodes_that_come_while_the_batch_waits_are_stored_then(monkeypatch):
    """The predictor's own worker (one slow step a round) finishes its episodes while the batch
    waits for the worker process (two slow steps): they are stored while it waits, not in the read
    that answers the batch; every step still becomes one engram."""
    reading, stored_while_waiting = [], []
    decide, flush = MemoryServer.decide, MemoryServer.flush

    def traced_decide(self, *args, **kwargs):
        reading.append(True)
        try:
            return decide(self, *args, **kwargs)
        finally:
            reading.pop()

    def traced_flush(self, *, final=False):
        stored = flush(self, final=final)
        if stored and not reading and not final:
            stored_while_waiting.append(stored)
        return stored

    monkeypatch.setattr(MemoryServer, "decide", traced_decide)
    monkeypatch.setattr(MemoryServer, "flush", traced_flush)
    trainer = AsyncTrainer(chain_brain, CHAIN, num_workers=3, episodes_per_worker=6, normalise_episodes=0,
                           max_seconds=RUN_LIMIT, seed=2, workers_per_process=2, predictor_workers=1,
                           env_kwargs={"step_seconds": 0.003})
    episodes = collect_run(trainer)
    assert trainer.stats.stop_reason == "finished" and len(episodes) == 18
    assert stored_while_waiting, "no episode was stored while the batch waited for the worker process"
    assert trainer.server.memory_sizes() == [sum(e.decisions for e in episodes)]


def failing_env_kwargs(tmp_path, mode):
    return {"fail_at_step": 9, "fail_mode": mode, "once_file": str(tmp_path / "failed")}


@pytest.mark.parametrize("predictor_workers", [0, 3])
def test_a_crashing_worker_stops_the_run_cleanly_with_its_traceback(tmp_path, capfd, predictor_workers):
    trainer = AsyncTrainer(chain_brain, CHAIN, num_workers=3, episodes_per_worker=30, normalise_episodes=0,
                           env_kwargs=failing_env_kwargs(tmp_path, "raise"), max_seconds=RUN_LIMIT,
                           predictor_workers=predictor_workers)
    with pytest.raises(WorkerFailed, match="Chain crashed on purpose") as info:
        collect_run(trainer)
    stats = trainer.stats
    assert info.value.stats is stats and stats.stop_reason.endswith("failed") and len(stats.errors) == 1
    assert "Traceback" in stats.errors[0]["report"] and "_maybe_fail" in stats.errors[0]["report"]
    assert "Chain crashed on purpose" in capfd.readouterr().err  # reported where a person sees it
    # every episode that finished before the stop is stored, nothing else
    assert len(trainer.server.brains[0].store) == stats.total_decisions > 0
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("resonant-worker")]


@pytest.mark.parametrize("workers_per_process, predictor_workers", [(1, 0), (2, 0), (1, 2)])
def test_a_crashed_worker_is_restarted_on_its_remaining_episodes(tmp_path, workers_per_process, predictor_workers):
    # with two workers in one process (or both in the predictor's), the crash takes both down and both
    # restart on their remaining episodes
    trainer = AsyncTrainer(chain_brain, CHAIN, num_workers=2, episodes_per_worker=6, normalise_episodes=0,
                           env_kwargs=failing_env_kwargs(tmp_path, "raise"), on_worker_error="restart",
                           max_seconds=RUN_LIMIT, workers_per_process=workers_per_process,
                           predictor_workers=predictor_workers)
    episodes = collect_run(trainer)
    stats = trainer.stats
    assert stats.stop_reason == "finished" and stats.restarts == 1 and len(stats.errors) == 1
    assert "Chain crashed on purpose" in stats.errors[0]["report"]
    for w in range(2):  # the restarted worker played exactly its remaining episodes
        assert sorted(e.index for e in episodes if e.worker == w) == list(range(6))
    assert len(trainer.server.brains[0].store) == sum(e.decisions for e in episodes)
    assert len(stats.worker_pids) == {(1, 0): 3, (2, 0): 2, (1, 2): 0}[workers_per_process, predictor_workers]
    assert stats.errors[0]["worker"] in ((0, 1) if workers_per_process == predictor_workers + 1 else ([0, 1],))
    if predictor_workers:
        assert "in the predictor's process" in stats.errors[0]["report"]


@pytest.mark.parametrize("mode, match, spin_wait", [("kill", "SIGKILL", 0.005), ("exit", "exited with code 3", 0.0)])
def test_a_worker_that_dies_without_a_traceback_is_reported(tmp_path, mode, match, spin_wait):
    # (polling: the predictor notices the pipe's end while it polls)
    trainer = AsyncTrainer(chain_brain, CHAIN, num_workers=2, episodes_per_worker=30, normalise_episodes=0,
                           env_kwargs=failing_env_kwargs(tmp_path, mode), max_seconds=RUN_LIMIT, spin_wait=spin_wait)
    with pytest.raises(WorkerFailed, match=match):
        collect_run(trainer)
    assert len(trainer.server.brains[0].store) == trainer.stats.total_decisions


def test_trainer_rejects_bad_arguments():
    for kwargs, match in [(dict(num_workers=0), "num_workers"), (dict(memory="pooled"), "memory"),
                          (dict(engine="dask"), "engine"), (dict(episodes_per_worker=0), "episodes"),
                          (dict(on_worker_error="ignore"), "on_worker_error"), (dict(max_seconds=0), "max_seconds"),
                          (dict(workers_per_process=0), "workers_per_process"),
                          (dict(engine="ray", workers_per_process=2), "one worker per actor"),
                          (dict(predictor_workers=-1), "predictor_workers"),
                          (dict(num_workers=2, predictor_workers=3), r"predictor_workers must be .* \[0, num_workers=2\]"),
                          (dict(engine="ray", predictor_workers=1), "every worker as an actor"),
                          (dict(spin_wait=-0.001), "spin_wait"), (dict(spin_wait=float("nan")), "spin_wait"),
                          (dict(spin_wait=float("inf")), "spin_wait"), (dict(spin_wait=True), "spin_wait"),
                          (dict(spin_wait="5"), "spin_wait"),
                          (dict(engine="ray", spin_wait=0.001), "only the local engine")]:
        with pytest.raises(ValueError, match=match):
            AsyncTrainer(chain_brain, CHAIN, **kwargs)
    with pytest.raises(ValueError, match="brain expects"):
        AsyncTrainer(chain_brain, "CartPole-v1")


# ---- the command line, and Ctrl-C --------------------------------------------------------
def descendants(pid: int) -> set:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in found:
                    found.add(c)
                    todo.append(c)
    return found


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def test_cli_train_async_writes_the_report(tmp_path):
    from resonant.cli import main

    assert main(["train-async", CHAIN, "--workers", "2", "--episodes-per-worker", "5", "--normalise-episodes", "2",
                 "--action-repeat", "1", "--bandwidth", "0.5", "--policy", "softmax", "--beta", "3",
                 "--workers-per-process", "2", "--predictor-workers", "0",
                 "--max-seconds", str(RUN_LIMIT), "--out", str(tmp_path), "--name", "run", "--no-progress"]) == 0
    report = json.loads((tmp_path / "run.json").read_text())
    s = report["summary"]
    assert s["episodes"] == 10 and s["stop_reason"] == "finished"
    assert s["memory"]["memory_sizes"] == [s["decisions"]] == [sum(report["summary"]["memory"]["engrams_written"])]
    assert report["config"]["policy"] == "softmax" and report["config"]["beta"] == 3.0
    assert report["config"]["workers_per_process"] == 2 and report["cli"]["workers_per_process"] == 2
    assert report["config"]["predictor_workers"] == 0
    assert set(s) >= {"episodes_per_s", "decisions_per_s", "mean_predictor_batch", "decision_latency_ms",
                      "request_wait_ms", "per_worker"}
    assert len(report["returns_worker1"]) == 5 and (tmp_path / "run.png").stat().st_size > 1000
    assert report["relevance"] == [None]  # no --relevance-every


def test_cli_train_async_avoid_repeats_and_relevance_reach_the_workers_and_the_report(tmp_path):
    from resonant.cli import main

    assert main(["train-async", "subgrid", "--workers", "2", "--episodes-per-worker", "3", "--normalise-episodes", "0",
                 "--action-repeat", "1", "--bandwidth", "0.4", "--match-threshold", "1.0", "--estimator", "mean",
                 "--avoid-repeats", "--relevance-every", "2", "--memory", "isolated",
                 "--max-seconds", str(RUN_LIMIT), "--out", str(tmp_path), "--name", "run", "--no-progress"]) == 0
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["config"]["avoid_repeats"] is True
    # each memory refitted its relevance (None: never fitted; the values are tested in test_engram_relevance.py)
    assert len(report["relevance"]) == 2 and all(r is not None and len(r) == 36 for r in report["relevance"])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the worker processes")
@pytest.mark.parametrize("predictor_workers, spin_ms", [(0, "0"), (1, "5")])
def test_ctrl_c_stops_the_run_within_seconds_and_leaves_nothing_behind(tmp_path, predictor_workers, spin_ms):
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    log = open(tmp_path / "log.txt", "w")
    cmd = [sys.executable, "-m", "resonant.cli", "train-async", CHAIN, "--workers", "3", "--episodes-per-worker",
           "1000000", "--normalise-episodes", "0", "--action-repeat", "1", "--bandwidth", "0.5",
           "--max-seconds", "300", "--out", str(tmp_path), "--name", "interrupted", "--no-progress",
           "--predictor-workers", str(predictor_workers), "--spin-wait-ms", spin_ms]
    expected = 4 - predictor_workers  # the fork server and the workers in processes
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(descendants(proc.pid)) < expected and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()
        time.sleep(1.0)  # decisions flowing
        started = descendants(proc.pid)
        assert len(started) >= expected
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        code = proc.wait(timeout=60)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (tmp_path / "log.txt").read_text()
    assert code == 130, output
    assert stopped_in < 20, f"took {stopped_in:.1f} s to stop"
    assert not wait_until_gone(started), "processes outlived the run"
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {n for n in shm_after - shm_before if "psm_" in n or "torch" in n}
    report = json.loads((tmp_path / "interrupted.json").read_text())
    s = report["summary"]
    assert s["stop_reason"] == "interrupted" and s["episodes"] > 0
    assert s["memory"]["memory_sizes"] == [s["decisions"]]  # every finished episode stored, exactly
    assert s["spin_wait_seconds"] == float(spin_ms) / 1e3


# ---- the Ray engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the Ray engine needs the `ray` extra (pip install 'resonant-kernels[ray]')")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}})
    yield ray
    ray.shutdown()


def test_ray_engine_restarts_a_crashed_worker_and_stores_every_step_exactly_once(local_ray, tmp_path):
    trainer = AsyncTrainer(chain_brain, CHAIN, num_workers=2, episodes_per_worker=5, normalise_episodes=2,
                           engine="ray", env_kwargs=failing_env_kwargs(tmp_path, "raise"),
                           on_worker_error="restart", max_seconds=RUN_LIMIT)
    episodes = []
    stats = trainer.train(progress=False, on_episode=episodes.append)
    assert stats.stop_reason == "finished" and stats.restarts == 1
    assert "Chain crashed on purpose" in stats.errors[0]["report"]  # the remote traceback
    for w in range(2):
        assert sorted(e.index for e in episodes if e.worker == w) == list(range(5))
    assert stats.memory["memory_sizes"] == [sum(e.decisions for e in episodes)] == [stats.total_decisions]
    assert stats.memory["engrams_written"] == stats.memory["memory_sizes"]
    assert sum(stats.batch_sizes) == stats.request_wait.count > 0
    assert 0 < stats.answering_seconds <= stats.wall_seconds
    # counted in the memory actor, up to the first worker's last episode (none is a restart's loss)
    assert 0 < stats.all_playing.decisions < sum(stats.batch_sizes)
    assert 0 < stats.all_playing.seconds < stats.answering_seconds


@pytest.mark.slow  # ~15-25 s of actor start-up on 2 cores; the restart test above covers crash reports on Ray
def test_ray_engine_stops_cleanly_when_a_worker_fails(local_ray, tmp_path):
    trainer = AsyncTrainer(chain_brain, CHAIN, num_workers=2, episodes_per_worker=40, normalise_episodes=0,
                           engine="ray", env_kwargs=failing_env_kwargs(tmp_path, "raise"), max_seconds=RUN_LIMIT)
    with pytest.raises(WorkerFailed, match="Chain crashed on purpose"):
        trainer.train(progress=False)
    assert trainer.stats.memory["memory_sizes"] == [trainer.stats.total_decisions]
