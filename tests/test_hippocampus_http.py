"""The hippocampus service over real loopback HTTP: uvicorn on a free port, the httpx client,
parity with a local PatternMemory, concurrency, bad input, and a schemathesis fuzz of the schema."""
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
httpx = pytest.importorskip("httpx", reason="the 'serve' extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")

from resonant.hippocampus import Client, PatternMemory  # noqa: E402
from resonant.hippocampus import patterns as patgen  # noqa: E402
from resonant.hippocampus.server import create_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """A uvicorn server in a thread on a free loopback port; its URL. Stopped after the module."""
    # max_train_passes keeps fuzzed train requests short (each holds its model while it runs)
    app = create_app(max_models=16, max_train_passes=200)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="hippocampus-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}", app
    uv.should_exit = True
    thread.join(30)
    assert not thread.is_alive(), "the test server did not stop"


@pytest.fixture
def url(server):
    return server[0]


def patterns(n=12, units=48, active=12, seed=0):
    return patgen.random_binary_patterns(n, units, active, generator=torch.Generator().manual_seed(seed))


def test_client_and_local_memory_agree(url):
    stored = patterns()
    local, remote = PatternMemory(48), Client(url, model="parity")
    try:
        for m in (local, remote):
            m.update(stored)
        cues = torch.cat([patgen.switch_off_first(stored, r) for r in (0.3, 0.9)])
        targets = stored.repeat(2, 1)
        for trained in (False, True):
            a, b = local.test_pattern(cues, targets), remote.test_pattern(cues, targets)
            for field in ("recalled", "distance", "closest_index", "closest_pattern"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field
            assert torch.equal(local.recall(cues, steps=3), remote.recall(cues, steps=3))
            assert torch.equal(local.step(cues, targets, 2), remote.step(cues, targets, 2))
            assert torch.equal(local.step(cues[0], targets[0]), remote.step(cues[0], targets[0]))
            single = remote.test_pattern(cues[1], targets[1])
            assert single.recalled.shape == (48,) and int(single.closest_index) == int(a.closest_index[1])
            if not trained:
                seconds = [m.train(epochs=2, seed=3) for m in (local, remote)]
                assert all(s > 0 for s in seconds)
        info = remote.info()
        assert info["trained"] and info["patterns"] == 12 and info["num_units"] == 48 and info["activity"] == 12
        # the same seed trains the same way, bit for bit (the cpu backward sums in a fixed order)
        assert info["inverse_temperature"] == local.inverse_temperature
    finally:
        remote.delete()
        remote.close()


def test_the_seed_routes_and_field_names(url):
    stored = patterns(4, 24, 6, seed=1)
    with httpx.Client(base_url=url) as http:
        r = http.put("/dataset/train/update", json={"patterns": stored.tolist(), "shape": [2, 3, 4]})
        assert r.status_code == 200 and r.json()["model"] == "default" and r.json()["binary"]
        r = http.post("/model/train", json={"maxepcs": 2, "maxruns": 1, "seed": 0})
        assert r.status_code == 200 and r.json()["seconds"] > 0
        r = http.post("/model/testpattern", json={"corrupted": patgen.switch_off_first(stored, 0.5)[2].tolist(),
                                                  "target": stored[2].tolist()})
        assert r.status_code == 200
        body = r.json()
        assert body["closest_index"] == 2 and body["distance"] == 0 and body["closest_pattern"] == stored[2].tolist()
        r = http.post("/model/step", json={"cues": stored.tolist(), "targets": stored.tolist(), "repeats": 5})
        assert r.json()["rewards"] == [24.0] * 4
        health = http.get("/health").json()
        assert health["status"] == "ok" and "default" in health["models"]
        assert http.get("/docs").status_code == 200
        paths = http.get("/openapi.json").json()["paths"]
        for route in ("/dataset/train/update", "/model/train", "/model/testpattern", "/model/step",
                      "/models/{name}/model/testpattern", "/health"):
            assert route in paths


def test_bad_requests_get_4xx_with_a_message(url):
    stored = patterns(3, 10, 3)
    with httpx.Client(base_url=url) as http:
        http.put("/models/bad/dataset/train/update", json={"patterns": stored.tolist()}).raise_for_status()
        cases = [
            ("PUT", "/models/bad/dataset/train/update", {"patterns": []}, 422, "patterns"),
            ("PUT", "/models/bad/dataset/train/update", {"patterns": [[0, 1], [1]]}, 422, "patterns"),
            ("PUT", "/models/bad/dataset/train/update", {"patterns": [[0, 0.5]], "binary": True}, 422, "binary"),
            ("PUT", "/models/bad/dataset/train/update", {"patterns": [[0, 1]], "shape": [3]}, 422, "shape"),
            ("PUT", "/models/bad/dataset/train/update", {"patterns": "x"}, 422, "patterns"),
            ("PUT", "/models/bad/dataset/train/update", {"patterns": [[1, 2]], "colour": 1}, 422, "colour"),
            ("POST", "/models/bad/model/train", {"epochs": 0}, 422, "epochs"),
            ("POST", "/models/bad/model/train", {"runs": "many"}, 422, "runs"),
            ("POST", "/models/bad/model/train", {"epochs": 10, "runs": 2}, 422, "max_train_passes"),
            ("POST", "/models/bad/model/testpattern", {"corrupted": [0] * 9, "target": [0] * 10}, 422, "units"),
            ("POST", "/models/bad/model/testpattern", {"corrupted": [[0] * 10], "target": [[0] * 10] * 2}, 422, "rows"),
            ("POST", "/models/bad/model/recall", {"cues": [0] * 11}, 422, "num_units"),
            ("POST", "/models/bad/model/step", {"cues": [[0] * 10], "targets": [[0] * 10], "repeats": 0}, 422,
             "repeats"),
            ("POST", "/models/missing/model/recall", {"cues": [0] * 10}, 404, "no training set"),
            ("GET", "/models/missing/model", None, 404, "no training set"),
            ("DELETE", "/models/missing", None, 404, "does not exist"),
            ("POST", "/models/bad name/model/recall", {"cues": [0] * 10}, 422, "name"),
        ]
        for method, path, body, status, words in cases:
            r = http.request(method, path, json=body)
            assert r.status_code == status, (path, body, r.text)
            assert words in r.json()["detail"], (path, body, r.text)
        r = http.post("/models/bad/model/recall", content=b'{"cues": [NaN, 0, 0, 0, 0, 0, 0, 0, 0, 0]}',
                      headers={"content-type": "application/json"})
        assert r.status_code == 422 and "NaN" in r.json()["detail"]
        r = http.post("/models/bad/model/recall", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        # the model survived every bad request
        r = http.post("/models/bad/model/testpattern", json={"corrupted": stored.tolist(), "target": stored.tolist()})
        assert r.status_code == 200 and r.json()["closest_index"] == [0, 1, 2]
    with Client(url, model="missing") as client, pytest.raises(ValueError, match="no training set"):
        client.recall(torch.zeros(10))


def test_concurrent_requests_to_one_model_are_serialised_and_lose_nothing(url):
    a, b = patterns(8, 40, 10, seed=2), patterns(8, 40, 10, seed=3)
    sets = {0: a, 1: b}
    with Client(url, model="busy") as setup:
        setup.update(a)
    errors, results = [], []

    def tester():
        with Client(url, model="busy") as c:
            for _ in range(6):
                res = c.test_pattern(a, a)
                results.append(res)

    def updater():
        with Client(url, model="busy") as c:
            for i in range(6):
                c.update(sets[i % 2])
                try:
                    c.update([[0.5] * 40], binary=True)  # fails: must not disturb the stored set
                except ValueError as exc:
                    errors.append(str(exc))
                c.train(epochs=1, seed=i)

    threads = [threading.Thread(target=tester) for _ in range(3)] + [threading.Thread(target=updater)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(errors) == 6 and all("binary" in e for e in errors)
    assert len(results) == 18
    for res in results:
        # each test saw one whole training set: every closest pattern comes from set a or all from set b
        from_a = all(p.tolist() in a.tolist() for p in res.closest_pattern)
        from_b = all(p.tolist() in b.tolist() for p in res.closest_pattern)
        assert from_a or from_b
    with Client(url, model="busy") as c:
        final = c.test_pattern(b, b)  # the last good update was set b (i = 5)
        assert torch.equal(final.closest_index, torch.arange(8))
        c.delete()


def test_two_models_run_side_by_side(url):
    sets = {"left": patterns(10, 36, 9, seed=4), "right": patterns(6, 20, 5, seed=5)}
    out = {}

    def work(name):
        with Client(url, model=name) as c:
            c.update(sets[name])
            c.train(epochs=2, seed=0)
            cues = patgen.switch_off_first(sets[name], 0.5)
            out[name] = (c.test_pattern(cues, sets[name]), c.info())

    threads = [threading.Thread(target=work, args=(n,)) for n in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, stored in sets.items():
        result, info = out[name]
        assert info["num_units"] == stored.shape[1] and info["patterns"] == len(stored)
        assert torch.equal(result.closest_index, torch.arange(len(stored)))
    with httpx.Client(base_url=url) as http:
        assert {"left", "right"} <= set(http.get("/health").json()["models"])
        for name in sets:
            assert http.delete(f"/models/{name}").status_code == 204
        assert not {"left", "right"} & set(http.get("/health").json()["models"])


def test_max_models_is_enforced_with_409(server):
    url, app = server
    registry = app.state.registry
    stored = patterns(2, 8, 2).tolist()
    with httpx.Client(base_url=url) as http:
        taken = len(registry.names())
        created = []
        for i in range(registry.max_models - taken):
            name = f"fill{i}"
            assert http.put(f"/models/{name}/dataset/train/update", json={"patterns": stored}).status_code == 200
            created.append(name)
        r = http.put("/models/one-too-many/dataset/train/update", json={"patterns": stored})
        assert r.status_code == 409 and "max_models" in r.json()["detail"]
        for name in created:
            http.delete(f"/models/{name}")


# ---- schemathesis: no input the schema admits (and none it does not) gets a 5xx --------------------

schemathesis = pytest.importorskip("schemathesis", reason="the 'serve' extra is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


def fuzz(url: str, mode) -> None:
    """Hypothesis drives schemathesis's cases for every operation of the served schema (valid
    bodies in POSITIVE mode, schema-violating ones in NEGATIVE mode); none may get a 5xx. As many
    examples as the hypothesis profile gives (conftest.py: `ci` by default, HYPOTHESIS_PROFILE=long
    for ten times more, freshly random)."""
    # a model on the default routes, so fuzzed operations reach the memory instead of stopping at 404
    httpx.put(f"{url}/dataset/train/update", json={"patterns": patterns(3, 4, 2).tolist()}).raise_for_status()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")

    @settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(mode))
    def run(case):
        case.call_and_validate(checks=[not_a_server_error])

    run()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_server_error(url, mode):
    fuzz(url, schemathesis.GenerationMode(mode))
