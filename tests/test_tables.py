"""Every table the CLI prints stays readable in an 80-column terminal (nothing cut to "…")
and shows everything in a wide one."""

from __future__ import annotations

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sstream.cli import app
from sstream.cli_render import epoch_table, predictions_table
from sstream.predict import Prediction
from sstream.task import Classification, Regression

runner = CliRunner()
METRICS = {"epoch": 3, "train_loss": 0.68271234, "val_loss": 0.6434, "val_accuracy": 0.5,
           "val_auc": 1.0, "lr": 0.00211, "seconds": 3.58, "images_per_s": 6.705,
           "tiles_per_s": 51.96, "peak_memory_mb": 8712.2}


def rendered(table, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text()


def assert_readable(text: str, width: int) -> None:
    assert "…" not in text, text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width, text


@pytest.mark.parametrize("width", [80, 200])
def test_the_epoch_and_prediction_tables(width):
    epoch = rendered(epoch_table(METRICS), width)
    assert_readable(epoch, width)
    for header in ("val loss", "val acc", "val AUC", "img/s", "tiles/s", "peak MB"):
        assert header in epoch
    assert "0.683" in epoch and "0.00211" in epoch and "8.71e+03" in epoch
    long_name = "images/a/very/long/folder/name/to/the/slide_with_a_long_name_024.tif"
    predictions = rendered(predictions_table([Prediction(long_name, [0.478, 0.522], 0)],
                                             Classification(2)), width)
    assert_readable(predictions, width)
    lines = predictions.splitlines()
    header = next(line for line in lines if "prob_0" in line)
    body = lines[lines.index(header) + 2:]  # below the rule
    column = "".join(line[:header.index("prob_0")].strip() for line in body)
    assert long_name in column  # folded onto several lines, never cut


@pytest.mark.parametrize("width", [80, 200])
def test_the_regression_tables(width):
    metrics = {**{k: v for k, v in METRICS.items() if k not in ("val_accuracy", "val_auc")},
               "val_spearman": 0.8123, "val_pearson": 0.7712, "val_mae": 1.234,
               "val_rmse": 1.5678}
    epoch = rendered(epoch_table(metrics), width)
    assert_readable(epoch, width)
    for text in ("Spearman", "Pearson", "MAE", "RMSE", "0.812", "1.57", "validation"):
        assert text in epoch
    task = Regression(("mitoses", "ki67"))
    predictions = rendered(predictions_table(
        [Prediction("slide_001.tif", [3.25, 0.125], (4.0, 0.5))], task), width)
    assert_readable(predictions, width)  # headers fold in 80 columns, never cut
    for text in ("3.25", "0.125", "4", "0.5", *(("prediction_mitoses", "label_ki67")
                                                if width > 80 else ())):
        assert text in predictions


@pytest.mark.parametrize("width", [80, 200])
def test_the_memory_table(width):
    done = runner.invoke(app, ["estimate-memory", "--size", "1024", "--model", "tiny",
                               "--tile-size", "256", "--tile-size", "512", "--budget",
                               "1GiB"], env={"COLUMNS": str(width)})
    assert done.exit_code == 0, done.output
    assert_readable(done.output, width)
    assert "whole-slide" in done.output and "compute" in done.output
    assert ("activations" in done.output) == (width >= 110)


def test_result_lines_and_the_slide_progress():
    """The jobs' results as cli_render prints them, and saliency's bars: one per phase, with
    rows for the quantisation and tiles before it."""
    from pathlib import Path

    from sstream.cli_render import SlideProgress, print_notes, print_tissue
    from sstream.tissue import TissuePreview

    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_tissue(console, TissuePreview(Path("a/slide.tif"), 0.4321, "auto",
                                        Path("slide.tif.tissue.png"), Path("m.png"), (64, 48)))
    print_notes(console, ["read at level 1", "read at level 1"])
    assert console.export_text().splitlines() == [
        "slide.tif: tissue 43.2% of the slide (auto); preview: slide.tif.tissue.png",
        "mask (64 x 48 px): m.png", "note: read at level 1", "note: read at level 1"]
    progress = SlideProgress(Console(width=120, file=open("/dev/null", "w")))  # noqa: SIM115
    for phase, done, total in (("saliency", 1, 4), ("saliency", 4, 4), ("quantise", 3, 9)):
        progress(phase, done, total)
    tasks = {task.description: task for task in progress.bar.tasks}
    assert tasks["saliency"].completed == 4 and tasks["quantise"].fields["unit"] == "rows"
    progress.close()
    assert not progress.bar.live.is_started


def test_predict_json_is_the_result_without_its_task():
    import json
    from pathlib import Path

    from sstream.cli_render import to_json
    from sstream.predict import PredictResult

    result = PredictResult([Prediction("a.tif", [0.25, 0.75], 1)], [("b.tif", "unreadable")],
                           None, Path("p.csv"), Classification(), notes=["read at level 1"])
    printed = json.loads(to_json(result))
    assert "task" not in printed and printed["out"] == "p.csv"
    assert printed["predictions"][0]["image"] == "a.tif"
    assert printed["failures"] == [["b.tif", "unreadable"]]
    assert printed["notes"] == ["read at level 1"] and printed["rank"] == 0
