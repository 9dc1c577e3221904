"""How the CLI shows the jobs' progress: rich progress bars, tables, or JSON lines.

The jobs report through event objects (`TrainEvents`, `PredictEvents`); these subclasses
render them. Nothing here computes anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from sstream.estimate import MemoryReport, format_bytes
from sstream.predict import PredictEvents, Prediction, PredictResult
from sstream.saliency import SaliencyEvents, SaliencyResult
from sstream.task import Evaluation, Task
from sstream.train import TrainEvents, TrainResult

if TYPE_CHECKING:
    from sstream.heatmap import HeatmapResult
    from sstream.tissue import TissuePreview


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


_EPOCH_COLUMNS = [("train_loss", "loss"), ("val_loss", "val loss"), ("val_accuracy", "val acc"),
                  ("val_auc", "val AUC"), ("val_spearman", "Spearman"),
                  ("val_pearson", "Pearson"), ("val_mae", "MAE"), ("val_rmse", "RMSE"),
                  ("lr", "lr"), ("seconds", "s"), ("images_per_s", "img/s"),
                  ("tiles_per_s", "tiles/s"), ("peak_memory_mb", "peak MB")]
_EPOCH_CAPTION = ("s: seconds of training; peak MB: peak memory of the process (CUDA: "
                  "allocated)")
_REGRESSION_CAPTION = "; Spearman, Pearson, MAE, RMSE: of the validation set"


_PATHS = {
    "whole-slide": "path: whole-slide (the head starts with global pooling: no feature map is "
                   "kept, and the backward re-runs only the tiles the gradient reaches)",
    "feature map": "path: feature map (the head runs conv stages: the streamed feature map "
                   "and its gradient are kept; stream the whole trunk for whole slides)",
}


class RichTrainEvents(TrainEvents):
    """An epoch bar, an image bar (loss, images/s, tiles/s) and a table after each epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = _progress(console)
        self.epoch_task: Any = None
        self.image_task: Any = None
        self.tiles_done = 0
        self.epoch_started = time.perf_counter()

    def on_start(self, info: dict[str, Any]) -> None:
        g = info["geometry"]
        self.console.print(
            f"training on [bold]{info['train_images']}[/bold] images "
            f"({info['val_images']} for validation) on {info['device']}; tile "
            f"{info['tile_size'][0]}x{info['tile_size'][1]} px, engine {info['engine']}, "
            f"output stride {g.stride[0]}, "
            f"receptive field {g.receptive_field[0]} px; outputs in {info['out']}")
        self.console.print(_PATHS[info["path"]])
        tissue = {"auto": "auto (found on each slide's thumbnail)",
                  "none": "none (every position counts)"}[info["tissue"]]
        previews = info.get("tissue_previews")
        self.console.print(f"tissue: {tissue}" + (f"; check the masks in {previews}"
                                                   if previews else ""))
        if info.get("tensorboard"):
            self.console.print(f"curves in TensorBoard: tensorboard --logdir "
                               f"{Path(info['tensorboard']).parent.parent}")
        epoch, index = info["resumed_at"]
        if epoch or index:
            self.console.print(f"resuming at epoch {epoch + 1}, image {index + 1}")
        self.progress.start()

    def on_epoch_start(self, epoch: int, epochs: int, images: int) -> None:
        if self.epoch_task is None:
            self.epoch_task = self.progress.add_task("epochs", total=epochs, completed=epoch,
                                                     status="")
        if self.image_task is not None:
            self.progress.remove_task(self.image_task)
        self.image_task = self.progress.add_task(f"epoch {epoch + 1}", total=images,
                                                 status="")
        self.epoch_started = time.perf_counter()

    def on_image(self, epoch: int, done: int, images: int, loss: float, tiles: int) -> None:
        self.tiles_done += tiles
        elapsed = max(time.perf_counter() - self.epoch_started, 1e-9)
        self.progress.update(self.image_task, completed=done, status=(
            f"loss {loss:.4f}  {done / elapsed:.2f} img/s  {self.tiles_done / elapsed:.1f} "
            "tiles/s"))

    def on_validation(self, done: int, images: int) -> None:
        self.progress.update(self.image_task, status=f"validating {done}/{images}")

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        self.tiles_done = 0
        self.progress.advance(self.epoch_task)
        self.progress.console.print(epoch_table(metrics))

    def close(self) -> None:
        self.progress.stop()


class JsonTrainEvents(TrainEvents):
    """One JSON object per line on stdout, for scripts."""

    def _emit(self, event: str, **fields: Any) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in fields.items()}
        sys.stdout.write(json.dumps({"event": event, **clean}, default=str) + "\n")
        sys.stdout.flush()

    def on_start(self, info: dict[str, Any]) -> None:
        g = info["geometry"]
        self._emit("start", **{k: v for k, v in info.items() if k != "geometry"},
                   output_stride=g.stride, receptive_field=g.receptive_field)

    def on_epoch_start(self, epoch: int, epochs: int, images: int) -> None:
        self._emit("epoch_start", epoch=epoch + 1, epochs=epochs, images=images)

    def on_image(self, epoch: int, done: int, images: int, loss: float, tiles: int) -> None:
        self._emit("image", epoch=epoch + 1, done=done, images=images, loss=loss, tiles=tiles)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        self._emit("epoch_end", **metrics)

    def on_checkpoint(self, path: Path) -> None:
        self._emit("checkpoint", path=str(path))


def print_train_end(console: Console, result: TrainResult) -> None:
    """The run's last line (rank 0 alone): how to continue an interrupted run, or why it
    ended and where its outputs are."""
    if result.rank != 0:
        return
    if result.interrupted:
        console.print(f"interrupted: last.pt holds the last completed step; continue with: "
                      f"sstream train --resume {result.out}")
    else:
        console.print(f"done ({result.stop_reason}): checkpoints, metrics.csv and curves.png "
                      f"in {result.out}")


class RichPredictEvents(PredictEvents):
    """A slide bar and a tile bar per slide."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = _progress(console)
        self.slides: Any = None
        self.tiles: Any = None

    def on_start(self, images: int) -> None:
        self.progress.start()
        self.slides = self.progress.add_task("slides", total=images, status="")

    def on_slide_start(self, image: str, tiles: int) -> None:
        if self.tiles is not None:
            self.progress.remove_task(self.tiles)
        self.tiles = self.progress.add_task(Path(image).name, total=tiles, status="tiles")

    def on_tile(self, phase: str, done: int, total: int) -> None:
        if self.tiles is not None:
            self.progress.update(self.tiles, completed=done)

    def on_slide_end(self, image: str, prediction: Prediction | None, error: str | None
                     ) -> None:
        self.progress.advance(self.slides)
        if error:
            self.progress.console.print(f"[red]skipped[/red] {image}: {error}")

    def close(self) -> None:
        self.progress.stop()


class RichSaliencyEvents(SaliencyEvents):
    """A bar per phase of the slide being mapped, and a line per slide once it is done."""

    def __init__(self, console: Console) -> None:
        self.progress = _progress(console)
        self.phases: dict[str, Any] = {}
        self.slides = 0

    def on_start(self, slides: int) -> None:
        self.slides = slides
        self.progress.start()

    def on_tile(self, phase: str, done: int, total: int) -> None:
        if phase not in self.phases:
            unit = "rows" if phase == "quantise" else "tiles"
            self.phases[phase] = self.progress.add_task(phase, total=total, status=unit)
        self.progress.update(self.phases[phase], completed=done)

    def on_slide_end(self, name: str, position: int, result: SaliencyResult | None,
                     error: str | None) -> None:
        for task in self.phases.values():
            self.progress.remove_task(task)
        self.phases = {}
        head = escape(f"[{position + 1}/{self.slides}] {name}:")
        line = f"{head} [red]skipped[/red]: {escape(str(error))}" if result is None else \
            escape(f"{head} {result.summary}; map {result.out} ({result.seconds:.1f} s)")
        self.progress.console.print(line, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.progress.stop()


class _RateColumn(ProgressColumn):
    """Tiles (or quantised rows) per second."""

    def render(self, task: Any) -> Text:
        unit = "rows" if task.fields.get("unit") == "rows" else "tiles"
        return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")


class SlideProgress:
    """One slide's progress as `compute_saliency` reports it, (phase, done, total): a bar per
    phase (the tiles, then the quantised rows) with its rate, shown from the first report."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(TextColumn("{task.description:>9}"), BarColumn(),
                            MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn(),
                            TextColumn("left"), TimeRemainingColumn(), console=console)
        self.phases: dict[str, TaskID] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.phases:
            self.bar.start()
        if phase not in self.phases:
            unit = "rows" if phase == "quantise" else "tiles"
            self.phases[phase] = self.bar.add_task(phase, total=total, unit=unit)
        self.bar.update(self.phases[phase], completed=done)

    def close(self) -> None:
        if self.phases:
            self.bar.stop()


def print_notes(console: Console, notes: Iterable[str]) -> None:
    """What a job noted on the way (a resolution assumed, a size clipped), a line each."""
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


def print_predictions(console: Console, result: PredictResult) -> None:
    """`sstream predict`'s result: the predictions, their evaluation against the labels,
    and the files written."""
    console.print(predictions_table(result.predictions, result.task))
    for evaluation in result.evaluations:
        console.print(evaluation_report(evaluation))
    if result.out:
        console.print(f"predictions written to {result.out}"
                      + "".join(f", {path}" for path in result.written))


def print_saliency(console: Console, result: SaliencyResult) -> None:
    """One slide's saliency map: the model's prediction, the map's size, resolution and
    files, and its values."""
    console.print(result.summary, highlight=False)
    resized = "" if result.resize == 1 else f" resized by {result.resize:.4g}"
    at = "" if result.mpp is None else f" at {result.mpp:.4g} µm/px"
    console.print(f"map {result.size[0]} x {result.size[1]} ({result.encoding}, level "
                  f"{result.level}{resized}{at}, {result.method}): {result.out}",
                  highlight=False)
    if result.overview is not None:
        console.print(f"overview: {result.overview}", highlight=False)
    console.print(f"values {result.min:.3g} .. {result.max:.3g}, scale {result.scale:.3g} "
                  f"(p{result.percentile:g} of |non-zero|), {result.tiles} tiles in "
                  f"{result.seconds:.1f} s", highlight=False, soft_wrap=True)


def print_heatmap(console: Console, result: HeatmapResult) -> None:
    """`sstream heatmap`'s map: the model's prediction, the map's kind, size and values."""
    console.print(result.summary, highlight=False)
    at = "" if result.mpp is None else f" at {result.mpp:.4g} µm/px"
    console.print(f"{result.kind} map {result.size[0]} x {result.size[1]} (1 pixel per "
                  f"{result.stride} slide pixels{at}), values {result.min:.3g} .. "
                  f"{result.max:.3g}, {result.seconds:.1f} s: {result.out}",
                  highlight=False, soft_wrap=True)


def print_tissue(console: Console, result: TissuePreview) -> None:
    """`sstream tissue`'s finding: the share of tissue, and the preview and mask written."""
    console.print(f"{result.slide.name}: tissue {result.fraction:.1%} of the slide "
                  f"({result.source}); preview: {result.preview}", highlight=False)
    if result.mask is not None:
        console.print(f"mask ({result.mask_size[0]} x {result.mask_size[1]} px): "
                      f"{result.mask}", highlight=False)


def print_memory_report(console: Console, result: MemoryReport, plot: Path | None) -> None:
    """`sstream estimate-memory`'s table, its advice (green where it fits, red where not),
    and the plot written."""
    console.print(memory_table(result, console.width))
    for advice in result.advice:
        style = "green" if advice["fits"] else "bold red"
        console.print(f"[{style}]{advice['message']}[/{style}]", highlight=False)
    if plot is not None:
        console.print(f"plot written to {plot}")


def epoch_table(metrics: dict[str, Any]) -> Group:
    """One epoch's row of metrics.csv, readable in 80 columns (no vertical rules): the
    losses and validation metrics, then the run's figures, then what the headers mean."""
    shown = [(key, header) for key, header in _EPOCH_COLUMNS if key in metrics]
    split = next((i for i, (key, _) in enumerate(shown) if key == "lr"), len(shown))
    tables = []
    for title, columns in ((f"epoch {metrics['epoch']}", shown[:split]), (None, shown[split:])):
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left",
                      collapse_padding=True, pad_edge=False)
        for _, header in columns:
            table.add_column(header, justify="right", no_wrap=True)
        table.add_row(*[_short(metrics[key]) for key, _ in columns])
        tables.append(table)
    caption = _EPOCH_CAPTION + (_REGRESSION_CAPTION if "val_spearman" in metrics else "")
    return Group(*tables, Text(caption, style="dim"))


def _short(value: Any) -> str:
    """A number in at most about 7 characters: 3 significant digits."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def predictions_table(predictions: list[Prediction], task: Task) -> Table:
    """The predictions CSV's columns (the task's), values to 4 significant digits."""
    table = Table(title="predictions", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("image", overflow="fold")
    with_labels = any(p.label is not None for p in predictions)
    for name in [*task.prediction_header(), *(task.label_header() if with_labels else [])]:
        table.add_column(name, justify="right", overflow="fold")
    for p in predictions:
        cells = [*task.prediction_cells(np.array(p.values)),
                 *(task.label_cells(p.label) if with_labels else [])]
        table.add_row(p.image, *(_number_or_name(c) for c in cells))
    return table


def _number_or_name(cell: str) -> str:
    """A number to 4 significant digits; a class name as it is."""
    try:
        return _fmt(float(cell))
    except ValueError:
        return cell


def metrics_line(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


_LEVELS = {"slide": "slides", "patient": "patients (a patient's slides' probabilities or "
           "values averaged)"}


def evaluation_report(evaluation: Evaluation, names: list[str] | None = None) -> Group:
    """An evaluation's headline (the AUC with its 95% bootstrap interval), its metrics and,
    for classification, the confusion matrix (rows true, columns predicted)."""
    metrics = dict(evaluation.metrics)
    head = f"{evaluation.count} {_LEVELS[evaluation.level]}"
    if evaluation.auc_ci is not None:
        low, high = evaluation.auc_ci
        head += (f": AUC {_fmt(metrics.pop('auc'))} (95% CI {_fmt(low)}-{_fmt(high)}, "
                 "1000 bootstrap resamples)")
    parts: list[Any] = [Text(head, style="bold"), Text(metrics_line(metrics))]
    if evaluation.confusion is not None:
        names = names or evaluation.names or [str(k) for k in range(len(evaluation.confusion))]
        parts.append(Text("confusion matrix (rows: true class, columns: predicted class)"))
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column("")
        for name in names:
            table.add_column(name, justify="right")
        for name, row in zip(names, evaluation.confusion):
            table.add_row(name, *(str(int(v)) for v in row))
        parts.append(table)
    return Group(*parts)


def info_table(info: Any) -> Group:
    """`sstream info`'s record of a slide (a `sstream.io.info.SlideInfo`): its path, the
    levels' table (within 80 columns), then the summary at the console's width (a table's
    caption would wrap at the table's)."""
    mpp = "unknown" if info.mpp is None else f"{info.mpp:.4g} µm/px"
    power = "" if info.objective_power is None else f", {info.objective_power:g}x objective"
    caption = [f"{info.format or 'image'} read by {info.backend}; level 0 at {mpp}{power}; "
               f"{info.file_bytes / 2**20:.1f} MiB on disk"]
    if info.associated:
        caption.append("associated: " + ", ".join(
            f"{name} {w} x {h}" for name, (w, h) in info.associated.items()))
    if info.chosen_level is not None:
        how = "as it is" if info.resize == 1 else f"resized by {info.resize:.4g}"
        caption.append(f"--mpp reads level {info.chosen_level} {how}: "
                       f"{info.read_size[0]} x {info.read_size[1]} px")
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("level", "width", "height", "downsample", "µm/px"):
        table.add_column(name, justify="right")
    for index, level in enumerate(info.levels):
        marker = " *" if index == info.chosen_level else ""
        table.add_row(f"{index}{marker}", str(level.width), str(level.height),
                      f"{level.downsample:g}", "-" if level.mpp is None else f"{level.mpp:.4g}")
    return Group(Text(str(info.path), style="italic"), table, Text("\n".join(caption)))


WIDE_TABLE = 110  # columns from which estimate-memory's table shows every component


def memory_table(result: MemoryReport, width: int = 200) -> Table:
    """The rows as a rich Table (the CLI prints it) for a terminal `width` columns wide.
    Model state (parameters, gradients, optimizer state) is the same in every row, so it goes
    in the caption; below WIDE_TABLE columns the table keeps the peak and leaves the
    components (activations, feature map, tile peak) to `--json`, so that it stays readable
    in 80 columns."""
    rows = result.rows
    first = rows[0]
    wide = width >= WIDE_TABLE
    title = (f"Predicted peak memory of one training step: {result.model}, "
             f"stream {result.stream_layers or 'whole trunk'}, {result.dtype}, "
             f"{result.optimizer}, batch 1")
    caption = (f"every row also holds parameters {format_bytes(first['parameters_bytes'])}, "
               f"gradients {format_bytes(first['gradients_bytes'])}, optimizer state "
               f"{format_bytes(first['optimizer_bytes'])}; compute = training FLOPs relative "
               "to conventional. Streaming rows: feature map = the streamed feature map and "
               "its gradient are kept; whole-slide = a pooling head, pooled tile by tile "
               "(no feature map; the backward re-runs only where the gradient goes: compute "
               "and peak are upper bounds with max pooling)"
               + ("" if wide else "; the components of each peak: --json or a terminal of "
                  f"{WIDE_TABLE}+ columns"))
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left",
                  box=box.SIMPLE_HEAD)
    details = ("activations", "fmap+grad", "tile peak") if wide else ()
    for name in ("image", "mode", "tile", *details, "peak", "vs conv.", "tiles", "compute"):
        left = name in ("image", "mode")
        table.add_column(name, justify="left" if left else "right",
                         no_wrap=name != "mode", overflow="fold")
    for row in rows:
        streaming = row["mode"] == "streaming"
        saving = row["saving"]
        versus = ("" if not streaming else f"{saving:.0%} less" if saving >= 0
                  else f"{-saving:.0%} more")
        components = [format_bytes(row["activations_bytes"]),
                      format_bytes(row["feature_map_bytes"]) if streaming else "-",
                      format_bytes(row["tile_peak_bytes"]) if streaming else "-"]
        table.add_row(
            f"{row['image_width']}x{row['image_height']}",
            f"{row['path']} ({row['engine']})" if streaming else row["mode"],
            str(row["tile_size"]) if streaming else "-", *(components if wide else []),
            f"[bold]{format_bytes(row['peak_bytes'])}[/bold]", versus,
            str(row["num_tiles"]), f"{row['compute_overhead']:.2f}x")
    return table


def verification_table(result: Any) -> Table:
    """`sstream verify`'s comparison (a `sstream.verify.Verification`), within 80 columns:
    the errors against the tolerance, then time and peak memory side by side."""
    height, width = result.verified_size
    title = (f"{result.model} ({result.path} path, stream "
             f"{result.stream_layers or 'whole trunk'}), {width}x{height} px, tile "
             f"{result.tile_size[0]}, {result.dtype}, {result.device}")
    caption = ("error: max |streamed - plain| / max |plain|; memory: peak of live tensor "
               "bytes of the step")
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for name in ("", "error", "conventional", "streamed"):
        table.add_column(name, justify="left" if not name else "right")
    verdict = "[green]ok[/green]" if result.passed else "[bold red]over tolerance[/bold red]"
    worst, worst_error = result.worst_param
    table.add_row("logits", f"{result.output_error:.2g}", "", "")
    table.add_row("input gradient", f"{result.input_grad_error:.2g}", "", "")
    table.add_row(f"{len(result.param_errors)} parameter gradients",
                  f"{max(result.param_errors.values()):.2g}", "", "")
    table.add_row(f"  worst: {worst}", f"{worst_error:.2g}", "", "")
    table.add_row("tolerance", f"{result.tolerance:.0e}", "", "")
    plain_s, streamed_s = result.seconds
    table.add_row("time", "", f"{plain_s:.2f} s",
                  f"{streamed_s:.2f} s ({streamed_s / max(plain_s, 1e-9):.2f}x)")
    plain_b, streamed_b = result.peak_bytes
    table.add_row("peak memory", "", _mib(plain_b),
                  f"{_mib(streamed_b)} ({plain_b / max(streamed_b, 1):.1f}x less)")
    table.add_row("verdict", verdict, "", "")
    return table


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def split_table(result: Any) -> Table:
    """`sstream split`'s counts (a `sstream.split.SplitResult`): slides, patients and
    slides per class (or target bin) of every split."""
    strata = sorted({s for c in result.counts for s in c.strata})
    table = Table(title=f"splits in {result.out} (slides per {result.strata_name})",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for header in ("split", "slides", "patients", *strata):
        table.add_column(header, justify="left" if header == "split" else "right")
    for c in result.counts:
        table.add_row(c.split, str(c.slides), str(c.patients),
                      *(str(c.strata.get(s, 0)) for s in strata))
    return table


def report_table(summary: Any) -> Group:
    """`sstream report`'s summary (a `sstream.report.Report`): mean ± sd of each metric
    over the runs' best epochs, and each run's value."""
    table = Table(title=f"{len(summary.runs)} runs, best epoch of each", box=box.SIMPLE_HEAD,
                  title_justify="left")
    table.add_column("metric")
    table.add_column("mean ± sd", justify="right")
    for index in range(len(summary.runs)):
        table.add_column(f"run {index + 1}", justify="right")
    for metric in summary.metrics:
        table.add_row(metric.name, f"{_fmt(metric.mean)} ± {_fmt(metric.sd)}",
                      *(_fmt(v) for v in metric.values))
    runs = "; ".join(f"run {i + 1}: {r.run} (epoch {r.best_epoch} of {r.epochs})"
                     for i, r in enumerate(summary.runs))
    return Group(table, Text(runs + "; sd: sample standard deviation (n - 1)", style="dim"))


def to_json(value: Any) -> str:
    """A job's result as indented JSON: dataclasses and `to_dict`s as objects, paths as
    strings, numpy arrays as lists."""
    return json.dumps(_plain(value), indent=2)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # paths, dtypes
