"""`sstream estimate-memory`: table, JSON, budget advice, plot, and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sstream.cli import app
from sstream.estimate import EstimateConfig, estimate_memory, parse_size
from sstream.runtime import parse_bytes

runner = CliRunner()


@pytest.mark.parametrize("text, expected", [
    ("12GiB", 12 * 2**30), ("12 GB", 12 * 10**9), ("500MiB", 500 * 2**20), ("12e9", 12 * 10**9),
    ("1.5 kib", 1536),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_size_is_width_by_height():
    assert parse_size("8192") == (8192, 8192)
    assert parse_size("8192x6144") == (6144, 8192)  # (height, width)


def test_library_rows_have_mode_tile_and_peak():
    result = estimate_memory(EstimateConfig(["512x384"], "tiny", tile_size=[128, 256],
                                            memory_budget="1GiB"))
    modes = [(r["mode"], r["tile_size"]) for r in result.rows]
    assert modes == [("conventional", None), ("streaming", 128), ("streaming", 256)]
    assert all(r["peak_bytes"] > 0 and r["image_width"] == 512 for r in result.rows)
    assert result.advice[0]["tile_size"] == 256 and result.advice[0]["fits"]


def test_json_output():
    done = runner.invoke(app, ["estimate-memory", "--size", "512", "--model", "tiny",
                               "--tile-size", "128", "--json"])
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    assert [r["mode"] for r in payload["rows"]] == ["conventional", "streaming"]
    assert payload["rows"][1]["tile_size"] == 128 and payload["rows"][0]["tile_size"] is None
    assert payload["engine"] == "auto" and payload["rows"][1]["engine"] == "halo"
    assert payload["rows"][1]["path"] == "whole-slide"  # tiny's head starts with pooling


def test_rows_say_which_path_they_model():
    """A split point that leaves conv stages in the head keeps the feature map; the whole
    trunk streamed (the default) takes the whole-slide path, whose peak does not hold it."""
    split = estimate_memory(EstimateConfig(["1024"], "tiny", "stage3", tile_size=[256]))
    whole = estimate_memory(EstimateConfig(["1024"], "tiny", tile_size=[256]))
    assert split.rows[1]["path"] == "feature map" and split.rows[1]["feature_map_bytes"]
    assert whole.rows[1]["path"] == "whole-slide"
    assert whole.rows[1]["feature_map_bytes"] == 0


def test_engine_option_models_the_crop_engine():
    """--engine crop: the rows model crops (more compute: the overlap), not halos."""
    args = ["estimate-memory", "--size", "512", "--model", "tiny", "--tile-size", "128", "--json"]
    rows = {engine: json.loads(runner.invoke(app, [*args, "--engine", engine]).stdout)["rows"][1]
            for engine in ("crop", "halo")}
    assert rows["crop"]["engine"] == "crop" and rows["halo"]["engine"] == "halo"
    assert rows["crop"]["compute_overhead"] > rows["halo"]["compute_overhead"]


def test_table_and_budget_message():
    done = runner.invoke(app, ["estimate-memory", "--size", "1024", "--model", "tiny",
                               "--tile-size", "256", "--tile-size", "512", "--budget", "8GiB"],
                         env={"COLUMNS": "160"})
    assert done.exit_code == 0, done.output
    assert "conventional" in done.stdout and "whole-slide (halo)" in done.stdout
    assert "tile 512 fits the budget 8 GiB" in done.stdout


def test_budget_that_nothing_fits_says_so_and_fails():
    done = runner.invoke(app, ["estimate-memory", "--size", "4096", "--model", "resnet18",
                               "--stream-layers", "layer1", "--tile-size", "1024",
                               "--budget", "100MiB"], env={"COLUMNS": "160"})
    assert done.exit_code == 1
    assert "nothing fits" in done.stdout and "stream more layers" in done.stdout


def test_plot_is_written(tmp_path):
    path = tmp_path / "mem.png"
    done = runner.invoke(app, ["estimate-memory", "--size", "512", "--model", "tiny",
                               "--tile-size", "256", "--budget", "1GiB", "--plot", str(path)])
    assert done.exit_code == 0, done.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--size", "512", "--model", "resnet19"], "unknown model"),
    (["--size", "-5"], "positive integer or WIDTHxHEIGHT"),
    (["--size", "512x0"], "positive integer or WIDTHxHEIGHT"),
    (["--size", "512", "--tile-size", "1024"], "larger than the image"),
    (["--size", "512", "--budget", "lots"], "cannot parse memory budget"),
    (["--size", "512", "--stream-layers", "layer9"], "valid split points"),
    (["--size", "512", "--engine", "halos"], "unknown engine 'halos'"),
])
def test_bad_input_is_one_line_and_non_zero(args, message):
    done = runner.invoke(app, ["estimate-memory", "--model", "tiny", *args])
    assert done.exit_code == 2
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.output
