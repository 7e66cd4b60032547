"""`resonant demo treeworld`: a quick run in the default suite, the full notebook sizes behind `slow`."""
import json
import struct

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("matplotlib")

from resonant.cli import build_parser, main  # noqa: E402
from resonant.treeworld_compare import NOTEBOOK, compare, value_at  # noqa: E402


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def run_demo(tmp_path, capsys, *extra):
    out = tmp_path / "demo"
    rc = main(["demo", "treeworld", "--out", str(out), *extra])
    assert rc == 0
    return json.loads((out / "numbers.json").read_text()), capsys.readouterr().out, out


def test_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "treeworld", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: hash)" in text and "(default: notebook)" in text
    assert "(default: runs/treeworld-demo)" in text
    args = build_parser().parse_args(["demo", "treeworld", "--grid", "7"])
    assert args.grid == 7 and args.range_seeds == 10 and callable(args.func)


def test_demo_quick_run_is_readable_and_complete(tmp_path, capsys):
    result, printed, out = run_demo(tmp_path, capsys, "--grid", "12", "--coarse-grid", "4", "--random-points", "30",
                                    "--prune-points", "96", "--regress-steps", "2", "--samples", "16",
                                    "--range-seeds", "2")
    numbers = result["numbers"]
    # piped output: no progress-bar residue, the embedder named, labels with the grid actually used
    assert "\r" not in printed and "it/s" not in printed
    assert "embedder: hash" in printed and "embedder: hash" in result["embedder"]
    assert "range over 2 seeds" in printed and "targets inside our range" in printed
    assert numbers["recall_grid.error"]["max"] < 1e-4  # reading the grid it was written on
    assert numbers["drive_classifier.tree_accuracy"] == 1.0
    assert round(numbers["sensor_at_origin.closest_distance"], 2) == 23.07  # the notebook's world
    assert 0 < numbers["gaussian.unmatched_fraction_at_threshold_100"] < 1
    assert numbers["prune.final_size"] < 96 and numbers["prune.removed_per_step"][0] > 0
    assert numbers["background_prune"]["kept_of_those"] == numbers["background_prune"]["written_meanwhile"] > 0
    for name in ("sample.free_T1_sigma25", "sample.sqrtE_temperature", "sample.location_biased"):
        assert 0 <= numbers[name]["min_hunger"] <= numbers[name]["avg_hunger"] <= 1
    rows = {row["label"]: row for row in result["comparison"]}
    loo = rows["leave-one-out error: mean"]
    assert loo["target"] and loo["ours"] == pytest.approx(numbers["leave_one_out.error"]["mean"])
    low, high = loo["range"]
    assert low <= loo["ours"] <= high  # seed 0 is one of the range seeds
    assert loo["verdict"] == ("inside" if low <= loo["notebook"] <= high else
                              "below range" if loo["notebook"] < low else "above range")
    assert rows["distance from (0, 0) to the closest tree (m)"]["verdict"].startswith("matches")
    figures = result["figures"]
    assert len(figures) == 21 and (out / "overview.png").exists()
    for path in figures:
        width, height = png_size(path)
        assert width >= 800 and height >= 500, (path, width, height)


def test_verdicts_compare_the_published_value_with_the_range():
    draws = [{"prune.final_size": 500, "prune.removed_per_step": [300, 0]},
             {"prune.final_size": 520, "prune.removed_per_step": [250, 20, 0]}]
    rows = {v.label: v for v in compare(draws[0], draws)}
    assert rows["memory size after pruning"].verdict == "inside"  # 509 in [500, 520]
    assert (rows["memory size after pruning"].low, rows["memory size after pruning"].high) == (500, 520)
    step2 = rows["removed by prune step 2"]
    assert (step2.low, step2.high, step2.published) == (0, 20, 127) and step2.verdict == "above range"
    assert rows["removed by prune step 7"].verdict == "inside"  # a stopped prune removes 0, as published
    assert rows["leave-one-out error: mean"].verdict == "no range measured"
    assert value_at(NOTEBOOK, ("regress.loss_every_10_steps", 12)) is None


# Ranges over memory seeds 0-9 recorded from `resonant demo treeworld` (README, "SpatialMemory and the
# tree world"); the seed-0 run must stay inside them, and each target's published value inside the
# ranges the run measures.
RECORDED = {
    "leave-one-out error: mean": (0.1275, 0.1534),
    "prune candidates at max error 0.05": (243, 285),
    "memory size after pruning": (506, 584),
    "grid read error vs sensor: mean": (0.441, 0.4916),
}


@pytest.mark.slow
def test_demo_at_notebook_sizes_reproduces_the_targets(tmp_path, capsys):
    result, printed, _ = run_demo(tmp_path, capsys, "--seed", "0", "--range-seeds", "10")
    rows = {row["label"]: row for row in result["comparison"]}
    for label, (low, high) in RECORDED.items():
        row = rows[label]
        assert row["target"] and row["verdict"] == "inside", row
        assert low <= row["ours"] <= high, row
    assert "targets inside our range: 4 of 4" in printed
