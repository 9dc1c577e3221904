"""The prediction job: class probabilities or predicted values for slides, by a streaming
forward pass.

Slides are read lazily (only the regions the tiles need), so their size is limited by disk,
not memory. One unreadable slide is reported and skipped; the others are still predicted.
The result CSV is written atomically; its columns are the model's task's (`sstream.task`):
`image, prob_0 .. prob_{K-1}, pred` for classification, `image, prediction` (or
`prediction_<name>` per target) for regression, then the label column(s) when the input CSV
had labels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstream.data import named_samples
from sstream.distributed import DataParallel
from sstream.engine import StreamingCNN
from sstream.errors import InputError
from sstream.io import atomic_output
from sstream.models import head_global_pool, load_checkpoint, model_outputs
from sstream.options import AS_TRAINED, ASSUME_MPP_HELP, DEVICE_HELP, Options, option
from sstream.reading import ReadSpec
from sstream.runtime import amp_dtype
from sstream.stain import slide_normaliser
from sstream.task import Evaluation, Task, evaluate_patients, task_for_model
from sstream.tissue import Tissue, output_mask

DEFAULT_TILE = 512  # predict's tile side for checkpoints that do not record training's


@dataclass
class PredictConfig(Options):
    """Options of `sstream predict`: their defaults and help. The read options (level or
    mpp, image_size, tissue) and the tile size default to the checkpoint's record of training
    (None)."""

    checkpoint: str = option(help="Checkpoint written by sstream train.")
    images: list[str] = option(help="Slides or images to predict.", factory=list)
    csv: str | None = option(None, "CSV with an image column (and optional labels) instead "
                             "of IMAGES.")
    out: str | None = option(None, "Write predictions to this CSV (columns image, "
                             "prob_<class>..., pred[, label]).")
    level: int | None = option(None, "Pyramid level to read.", shown=AS_TRAINED)
    mpp: float | None = option(None, "Read at exactly this many µm per pixel.", shown=AS_TRAINED)
    assume_mpp: float | None = option(None, ASSUME_MPP_HELP)
    image_size: tuple[int, int] | None = option(  # (height, width)
        None, "Centre crop or pad to N or WxH; whole: the whole image.", shown=AS_TRAINED)
    whole_image: bool = False       # read whole images, whatever crop training used
    tile_size: int | None = option(None, "Tile side in input pixels.",  # None: DEFAULT_TILE
                                   shown="training's, else 512")
    device: str = option("auto", DEVICE_HELP)
    amp: bool = option(False, "Mixed precision inference.")
    overwrite: bool = option(False, "Replace an existing output file.")
    tissue: str | None = option(None, "auto, none, or a mask image (one slide); a CSV's mask "
                                "column gives slides their own masks.", shown=AS_TRAINED)

    def validate(self) -> None:
        """ValueError for options that cannot work (the read options: ReadSpecError)."""
        ReadSpec(self.level, self.mpp, self.assume_mpp, self.image_size)
        if self.tile_size is not None and self.tile_size <= 0:
            raise InputError("--tile-size must be positive")


@dataclass
class Prediction:
    image: str
    values: list[float]          # class probabilities, or predicted values (one per target)
    label: int | tuple[float, ...] | None = None
    patient: str | None = None


@dataclass
class PredictResult:
    predictions: list[Prediction]
    failures: list[tuple[str, str]]          # (image, reason)
    metrics: dict[str, float] | None
    out: Path | None
    task: Task
    evaluations: list[Evaluation] = field(default_factory=list)  # slide, then patient level
    written: list[Path] = field(default_factory=list)   # the report files beside `out`
    notes: list[str] = field(default_factory=list)      # where reading departs from training
    rank: int = 0         # under torchrun: this process's rank (only rank 0 writes and prints)

    def to_dict(self) -> dict[str, Any]:
        """Every field but the task (the model's, not a result: predictions and evaluations
        name its classes), as `--json` prints them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task"}


class PredictEvents:
    """Hooks for progress display; no-ops here."""

    def on_start(self, images: int) -> None: ...
    def on_slide_start(self, image: str, tiles: int) -> None: ...
    def on_tile(self, phase: str, done: int, total: int) -> None: ...
    def on_slide_end(self, image: str, prediction: Prediction | None, error: str | None
                     ) -> None: ...


def predict(config: PredictConfig, events: PredictEvents | None = None) -> PredictResult:
    """Predict every image; see the module docstring.

    Raises:
        ValueError / FileNotFoundError: unreadable checkpoint, bad CSV, conflicting options
            (`PredictConfig.validate`).
        FileExistsError: the output CSV exists and not `overwrite`.
    """
    config.validate()
    events = events or PredictEvents()
    if config.out and Path(config.out).exists() and not config.overwrite:
        raise FileExistsError(f"{config.out} exists; use --overwrite to replace it")
    parallel, device = DataParallel.from_env(config.device)
    try:
        return _predict(config, events, parallel, device)
    finally:
        parallel.close()


def _predict(config: PredictConfig, events: PredictEvents, parallel: DataParallel,
             device: torch.device) -> PredictResult:
    """`predict` in one process of `parallel`: under torchrun each rank predicts every
    world_size-th slide, and rank 0 gathers the results in input order and writes them."""
    model = load_checkpoint(config.checkpoint).to(device).eval()
    trained = ReadSpec.for_model(model.config)
    spec = trained.overridden(config.level, config.mpp, config.image_size, config.tissue,
                              config.assume_mpp)
    if config.whole_image:
        if config.image_size is not None:
            raise InputError("give --image-size N|WxH or whole, not both")
        spec = replace(spec, image_size=None)
    scnn = StreamingCNN(model.stream, config.tile_size or model.config.tile_size
                        or DEFAULT_TILE)
    scnn.on_tile = events.on_tile
    task = task_for_model(model)
    inputs = named_samples(config.images, config.csv, task)
    tissue = Tissue.parse(spec.tissue, model.config.tissue)
    if tissue.is_file and len(inputs) > 1:
        raise InputError("--tissue PATH is the mask of one slide; give each slide its mask "
                         "in the CSV's mask column")
    if head_global_pool(model.head) is None and (tissue.choice != "none" or any(
            sample.mask for _, sample in inputs)):
        raise InputError("tissue masks need a model whose head starts with global pooling "
                         "(trained without --stream-layers); use --tissue none")
    events.on_start(len(inputs))
    outcomes: list[tuple[int, Prediction | None, str | None]] = []  # (position, ...)
    dtype = amp_dtype(device, None)
    for position in parallel.shard(0, len(inputs)):
        name, sample = inputs[position]
        label = sample.label
        try:
            with spec.open(sample) as read:
                read.source.stain = slide_normaliser(model.config.stain_normalize, read)
                mask = output_mask(read.source, scnn)
                events.on_slide_start(name, len(scnn.plan(read.source.shape)))
                outputs = model_outputs(model, scnn, read.source, config.amp, dtype, mask)
        except (ValueError, OSError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            outcomes.append((position, None, reason))
            events.on_slide_end(name, None, reason)
            continue
        prediction = Prediction(name, [float(v) for v in task.predictions(outputs)], label,
                                sample.patient)
        outcomes.append((position, prediction, None))
        events.on_slide_end(name, prediction, None)
    if parallel.distributed:  # every rank's outcomes, back in input order
        outcomes = sorted(o for part in parallel.gather_objects(outcomes, "gathering the "
                                                                "predictions") for o in part)
    predictions = [p for _, p, _ in outcomes if p is not None]
    failures = [(inputs[i][0], reason) for i, p, reason in outcomes if p is None]
    evaluations = evaluate_predictions(predictions, task)
    out = Path(config.out) if config.out else None
    written = []
    if out is not None and parallel.is_main:
        write_predictions(out, predictions, task, config.overwrite)
        written = write_evaluations(out, evaluations, predictions, task)
    return PredictResult(predictions, failures,
                         evaluations[0].metrics if evaluations else None, out, task,
                         evaluations, written, spec.notes(trained), parallel.rank)


def evaluate_predictions(predictions: list[Prediction], task: Task) -> list[Evaluation]:
    """The labelled predictions' evaluation (`Task.evaluate`: metrics, the AUC's 95%
    bootstrap interval from 1000 seeded resamples), then the same at patient level when
    every labelled slide names its patient (a patient's slides' probabilities averaged);
    empty without labels."""
    labelled = [p for p in predictions if p.label is not None]
    if not labelled:
        return []
    values, labels = np.array([p.values for p in labelled]), [p.label for p in labelled]
    evaluations = [task.evaluate(values, labels)]
    if all(p.patient for p in labelled):
        evaluations.append(evaluate_patients(task, values, labels,
                                             [p.patient for p in labelled]))
    return evaluations


def write_evaluations(out: Path, evaluations: list[Evaluation], predictions: list[Prediction],
                      task: Task) -> list[Path]:
    """Beside the predictions CSV `NAME.csv`: `NAME.metrics.json` (every evaluation) and the
    slide level's figures (`NAME.confusion.png`, `NAME.roc.png` for classification)."""
    if not evaluations:
        return []
    prefix = out.with_suffix("")
    report = prefix.with_name(prefix.name + ".metrics.json")
    with atomic_output(report, overwrite=True) as tmp:
        tmp.write_text(json.dumps([e.to_dict() for e in evaluations], indent=2))
    labelled = [p for p in predictions if p.label is not None]
    return [report, *task.write_figures(prefix.with_name(prefix.name + "."),
                                        np.array([p.values for p in labelled]),
                                        [p.label for p in labelled])]


def write_predictions(path: Path, predictions: list[Prediction], task: Task,
                      overwrite: bool) -> None:
    """The predictions CSV, written atomically."""
    with_labels = any(p.label is not None for p in predictions)
    columns = ["image", *task.prediction_header()]
    columns += task.label_header() if with_labels else []
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for p in predictions:
                row = [p.image, *task.prediction_cells(np.array(p.values))]
                writer.writerow(row + (task.label_cells(p.label) if with_labels else []))
