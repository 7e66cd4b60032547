"""`resonant train --store milvus-lite:PATH` resumes a stored memory (unless --fresh), and refuses
a memory it cannot continue with one line saying why."""
from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("pymilvus", reason="the `milvus` extra")
pytest.importorskip("milvus_lite", reason="the `milvus` extra")

from resonant.cli import main  # noqa: E402
from resonant.engram.milvus_store import MilvusEngramStore  # noqa: E402


def train(*extra: str) -> int:
    return main(["train", "cartpole", "--episodes", "25", "--no-progress", "--store", "milvus-lite:store/e.db",
                 *extra])


def report(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / f"{name}.json").read_text())


def stored(tmp_path) -> tuple[int, dict]:
    with MilvusEngramStore(4, 2, str(tmp_path / "store" / "e.db"), collection="engrams_cartpole_seed0") as store:
        return len(store), store.metadata()["resonant.train"]


def test_second_run_resumes_then_fresh_starts_over(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    assert train() == 0
    first = report(tmp_path, "engram_cartpole_seed0")
    engrams, state = stored(tmp_path)
    assert first["episodes_before"] == 0 and engrams > 0
    assert state["episodes"] == 25 and len(state["normaliser"]["mean"]) == 4

    assert train() == 0
    assert "resuming" in capsys.readouterr().out
    second = report(tmp_path, "engram_cartpole_seed0_from25")  # the first run's report is kept
    assert second["episodes_before"] == 25
    assert report(tmp_path, "engram_cartpole_seed0") == first
    more, state2 = stored(tmp_path)
    assert more > engrams and state2["episodes"] == 50
    assert state2["normaliser"] == state["normaliser"]  # the engrams keep the coordinates they were stored in
    assert second["episode_returns"] != first["episode_returns"]  # new episodes (reset seeds continue)

    assert train("--fresh") == 0
    assert report(tmp_path, "engram_cartpole_seed0")["episode_returns"] == first["episode_returns"]  # seeded
    assert stored(tmp_path)[0] == engrams
    assert not [r for r in caplog.records if "mvccTs" in r.getMessage()]  # pymilvus' Milvus Lite noise


def test_a_memory_it_cannot_continue_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train() == 0
    capsys.readouterr()
    assert train("--gamma", "0.9") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gamma 0.96 (now 0.9)" in err and "--fresh" in err

    with MilvusEngramStore(4, 2, str(tmp_path / "store" / "e.db"), collection="engrams_cartpole_seed0") as store:
        store.set_metadata({})  # engrams without a record of their normaliser (another program wrote them)
    assert train() == 2
    assert "no record of the observation normaliser" in capsys.readouterr().err


def test_milvus_uri_rules(tmp_path):
    with pytest.raises(ValueError, match="ending in .db"):
        MilvusEngramStore(4, 2, str(tmp_path / "engrams"))
    (tmp_path / "plain.db").write_text("not a database")
    with pytest.raises(ValueError, match="is a regular file"):
        MilvusEngramStore(4, 2, str(tmp_path / "plain.db"))
    with MilvusEngramStore(4, 2, str(tmp_path / "new" / "folder" / "e.db")) as store:  # parents are created
        assert len(store) == 0 and store.metadata() == {}
    assert (tmp_path / "new" / "folder" / "e.db").is_dir()  # Milvus Lite keeps its database as a folder
