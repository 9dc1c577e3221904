"""The command line's surface: one spelling per concept, clean help, --version and -h,
--json wherever a command prints a result, and bad inputs answered alike across commands."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import sstream
from sstream.cli import app
from sstream.io import write_synthetic_slide

runner = CliRunner()
COMMANDS = ["train", "predict", "saliency", "heatmap", "view", "verify", "tissue", "info",
            "estimate-memory", "split", "report", "make-sample-data"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("surface") / "slide.tif"
    write_synthetic_slide(path, 512, 1, seed=1, tile=64)
    return path


def help_of(command: str) -> str:
    # rich sizes the help from COLUMNS (click's terminal_width does not reach it)
    result = runner.invoke(app, [command, "-h"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_version_and_short_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"sstream {sstream.__version__}"
    top = runner.invoke(app, ["-h"], terminal_width=200).output
    assert "Usage: sstream" in top and "1.7x" not in top and "<bool>" not in top


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_clean(command):
    text = help_of(command)
    assert "<bool>" not in text and "<list[" not in text, text
    assert "--no-overwrite" not in text  # --overwrite is one flag everywhere
    assert ("--json" in text) == (command != "view"), "every command with a result: --json"
    assert not re.search(r"\d (MiB|GiB|s\b)", text), "measured numbers: docs/benchmarks.md"


def test_markup_does_not_eat_brackets():
    assert "[min-size, size]" in help_of("make-sample-data")


def test_one_name_per_concept():
    assert "--image-size" in help_of("verify") and "--image-size" in help_of("estimate-memory")
    assert "--memory-budget" in help_of("estimate-memory")
    assert "--amp-dtype" in help_of("estimate-memory")
    assert "--tiff-tile-size" in help_of("make-sample-data")
    for old in ("--budget", "--dtype"):  # still read, no longer shown
        assert old not in help_of("estimate-memory")


def estimate_json(*args: str) -> dict:
    result = runner.invoke(app, ["estimate-memory", "--model", "tiny", "--tile-size", "256",
                                 "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_old_spellings_still_work():
    new = estimate_json("--image-size", "512", "--memory-budget", "1GiB", "--amp-dtype", "bf16")
    old = estimate_json("--size", "512", "--budget", "1GiB", "--dtype", "bfloat16")
    assert new == old and new["budget_bytes"] == 2**30
    assert new != estimate_json("--image-size", "512", "--memory-budget", "1GiB")


def test_info_summary_is_not_wrapped_at_the_table_width(slide):
    result = runner.invoke(app, ["info", str(slide)])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("generic-tiff read by tifffile; level 0 at") and
               line.rstrip().endswith("MiB on disk") for line in result.output.splitlines())


def test_info_reports_each_slide(slide, tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing.tif"), str(slide)])
    assert result.exit_code == 1
    assert "missing.tif" in result.stderr and "level" in result.stdout  # the other is shown
    listed = runner.invoke(app, ["info", "--json", str(slide), str(tmp_path / "missing.tif")])
    records = json.loads(listed.stdout)
    assert records[0]["path"] == str(slide) and "missing.tif" in records[1]["error"]


@pytest.mark.parametrize("args", [["--mpp", "nan"], ["--mpp", "inf"], ["--mpp", "0"],
                                  ["--max-side", "5"]])
def test_info_bad_values_are_usage_errors(slide, args):
    result = runner.invoke(app, ["info", *args, str(slide)])
    assert result.exit_code == 2 and result.stderr.startswith("error:"), result.output
    assert "Traceback" not in result.output


def test_choices_ignore_case(slide, tmp_path, monkeypatch):
    monkeypatch.setenv("SSTREAM_BACKEND", "auto")  # --backend sets it for the process: undo
    out = tmp_path / "preview.png"
    result = runner.invoke(app, ["tissue", str(slide), "--tissue", "AUTO", "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"] == "auto" and out.is_file()
    assert runner.invoke(app, ["--backend", "TIFFFILE", "info", str(slide)]).exit_code == 0
    shouted = estimate_json("--image-size", "512", "--model", "TINY", "--engine", "HALO",
                            "--optimizer", "SGD", "--amp-dtype", "BF16")
    assert shouted == estimate_json("--image-size", "512", "--model", "tiny", "--engine", "halo",
                                    "--optimizer", "sgd", "--amp-dtype", "bf16")


def test_make_sample_data_json(tmp_path):
    result = runner.invoke(app, ["make-sample-data", str(tmp_path / "d"), "--count", "2",
                                 "--size", "64", "--tiff-tile-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["slides"] == 2 and (tmp_path / "d" / "train.csv").samefile(
        written["train_csv"])


PANELS = ("Data", "Model", "Map", "Reading", "Training", "Streaming", "Cohort", "Output",
          "Distributed")   # train's panels, and saliency's and heatmap's Map


def visible_options() -> dict[str, list]:
    """Each command's options that --help lists (not --help itself, nor hidden ones)."""
    import typer

    group = typer.main.get_command(app)
    context = typer.Context(group)
    commands = {name: group.get_command(context, name) for name in group.list_commands(context)}
    return {name: [param for param in command.params if isinstance(param, typer.core.TyperOption)
                   and not param.hidden]
            for name, command in commands.items()}


def test_every_long_command_groups_all_its_options_in_panels():
    for command, options in visible_options().items():
        panels = [option.rich_help_panel for option in options]
        if len(options) > 8 or any(panels):
            assert set(panels) <= set(PANELS), (command, panels)


def test_one_concept_sits_in_one_panel():
    """An option that several commands share is found under the same panel in each (a seed
    is no shared concept: training order, random pixels, synthetic slides, a shuffle)."""
    from collections import defaultdict

    panels = defaultdict(set)
    for options in visible_options().values():
        for option in options:
            if option.rich_help_panel is not None:
                panels[option.opts[0]].add(option.rich_help_panel)
    spread = {name: found for name, found in panels.items() if len(found) > 1}
    assert set(spread) <= {"--seed"}, spread
    assert panels["--json"] == {"Output"} and panels["--image-size"] == {"Reading"}


def test_device_help_is_one_text():
    import typer

    group = typer.main.get_command(app)
    context = typer.Context(group)
    helps = {param.help for name in ("train", "predict", "saliency", "verify")
             for param in group.get_command(context, name).params if param.name == "device"}
    assert len(helps) == 1, helps
