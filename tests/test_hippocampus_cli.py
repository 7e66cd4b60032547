"""`resonant experiment recall` and `resonant serve hippocampus` (parsing), and the extras' errors."""
import json

import numpy as np
import pytest

from resonant import cli
from resonant.extras import require


def test_experiment_recall_writes_the_grid_and_heatmap(tmp_path):
    pytest.importorskip("matplotlib", reason="the 'serve' extra is not installed")
    out = tmp_path / "recall"
    assert cli.main(["experiment", "recall", "--max-n", "6", "--trials", "2", "--epochs", "1", "--out", str(out),
                     "--compare-untrained"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["counts"] == [2, 4, 6] and result["ratios"] == [i / 10 for i in range(10)]
    for key in ("recall", "nearest", "untrained"):
        grid = np.array(result[key])
        assert grid.shape == (3, 10) and ((grid >= 0) & (grid <= 1)).all()
    # with 18 or more of 36 active units left, recall is exact (the patterns are random)
    assert np.array(result["recall"])[:, :6].min() == 1.0
    assert np.load(out / "results.npy").shape == (3, 10)
    assert (out / "heatmap.png").stat().st_size > 10_000
    assert result["seconds"] > 0 and set(result["seconds_by_operation"]) == {"update", "train", "test"}


def test_serve_hippocampus_parses_its_options():
    args = cli.build_parser().parse_args(["serve", "hippocampus", "--port", "0", "--threads", "1"])
    assert args.host == "127.0.0.1" and args.port == 0 and args.max_train_passes == 160_000
    assert args.func.__name__ == "serve"


def test_a_missing_extra_is_one_line_naming_it():
    with pytest.raises(ImportError) as err:
        require("surely_not_installed_module", "serve", "the widget")
    message = str(err.value)
    assert "\n" not in message and "`serve` extra" in message and "resonant-kernels[serve]" in message
