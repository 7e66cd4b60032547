"""A missing optional dependency gives one line naming the extra, for every command and class that
needs one. Missing packages are simulated by blocking their import (sys.modules[name] = None)."""
from __future__ import annotations

import sys

import pytest

from resonant.extras import EXTRA_OF, MissingExtra, require


def block(monkeypatch, *modules: str) -> None:
    """Makes `import module` fail as if it were not installed, and forgets modules that imported it."""
    for name in list(sys.modules):
        if name.startswith(("resonant.sim", "resonant.demo_treeworld")) or name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_require_names_the_extra_and_the_missing_module(monkeypatch):
    block(monkeypatch, "gymnasium")
    with pytest.raises(MissingExtra) as info:
        require("gymnasium", "rl", "the thing")
    message = str(info.value)
    assert one_line(message) == message
    assert message == "the thing needs the `rl` extra: pip install 'resonant-kernels[rl]' (gymnasium is not installed)"
    assert isinstance(info.value, ModuleNotFoundError)  # `except ImportError` keeps working


def test_extras_listed_exist_in_pyproject():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)


@pytest.mark.parametrize("argv, extra", [
    (["train", "cartpole", "--episodes", "1"], "rl"),
    (["demo", "treeworld", "--grid", "4"], "rl"),
])
def test_commands_print_one_line_without_the_rl_extra(argv, extra, monkeypatch, capsys, tmp_path):
    from resonant.cli import main

    monkeypatch.chdir(tmp_path)
    block(monkeypatch, "gymnasium")
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith(f"resonant: error: resonant {argv[0]}") and f"pip install 'resonant-kernels[{extra}]'" in line
    assert not list(tmp_path.iterdir())  # it stopped before writing anything


def test_train_checks_matplotlib_before_training(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gymnasium")
    from resonant.cli import main

    monkeypatch.chdir(tmp_path)
    block(monkeypatch, "matplotlib")
    assert main(["train", "cartpole", "--episodes", "1"]) == 2
    assert "matplotlib is not installed" in one_line(capsys.readouterr().err)


def test_train_with_a_milvus_store_without_the_milvus_extra(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gymnasium")
    from resonant.cli import main

    monkeypatch.chdir(tmp_path)
    block(monkeypatch, "pymilvus")
    assert main(["train", "cartpole", "--episodes", "1", "--store", "milvus-lite:e.db"]) == 2
    assert "pip install 'resonant-kernels[milvus]'" in one_line(capsys.readouterr().err)


def test_classes_raise_one_line_naming_the_extra(monkeypatch, tmp_path):
    import torch

    from resonant import EngramBrain, TorchEngramStore, Trainer
    from resonant.engram.milvus_store import MilvusEngramStore

    monkeypatch.chdir(tmp_path)
    block(monkeypatch, "pymilvus", "gymnasium")
    with pytest.raises(MissingExtra, match=r"MilvusEngramStore needs the `milvus` extra"):
        MilvusEngramStore(4, 2, "x.db")
    brain = EngramBrain(TorchEngramStore(4, 2))
    with pytest.raises(MissingExtra, match=r"Trainer needs the `rl` extra"):
        Trainer(brain, "CartPole-v1")
    import resonant.sim  # the embedders and the tree table need no extra

    with pytest.raises(MissingExtra, match=r"resonant.sim.TreeWorld needs the `rl` extra"):
        resonant.sim.TreeWorld  # noqa: B018
    with pytest.raises(MissingExtra, match=r"needs the `milvus` extra"):
        import resonant

        resonant.MilvusEngramStore(4, 2, "x.db")
    assert torch.is_tensor(brain.action_scores(torch.zeros(1, 4))[0])  # the torch path needs no extra
