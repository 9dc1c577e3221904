"""A training run's parts, built from its options before the first step.

`build_parts` reads the CSVs (the task fits its labels), builds the model (its init draws
from torch's RNG, seeded by the caller), chooses what pooling runs over (tissue), opens every
image once to refuse unreadable or too small ones, picks the tile (or the largest one that
fits `--memory-budget`), and makes the optimizer, schedule and AMP scaler.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sstream.data import Sample, read_label_csv
from sstream.engine import StreamingCNN
from sstream.engine.memory import estimate_training_memory, largest_fitting_row
from sstream.errors import InputError
from sstream.io import atomic_output, open_image
from sstream.models import (
    Classifier,
    ModelConfig,
    build_model,
    freeze_batchnorm,
    minimum_input_size,
    training_path,
)
from sstream.runtime import amp_dtype, parse_bytes
from sstream.task import Classification, Regression, Task
from sstream.tissue import Tissue, write_preview

if TYPE_CHECKING:
    from sstream.train import TrainConfig

TILE_CANDIDATES = (128, 256, 512, 1024, 2048, 4096, 8192)
PREVIEW_SLIDES = 4  # training slides whose tissue masks are drawn into out/tissue/


@dataclass
class TrainingParts:
    """What a run trains with: everything built from its options before the first step."""

    config: TrainConfig
    device: torch.device
    task: Task
    train_samples: list[Sample]
    val_samples: list[Sample]
    sampling: np.ndarray | None      # each image's probability (--balance sampler), or None
    model: Classifier
    tissue: Tissue
    scnn: StreamingCNN               # streams model.stream tile by tile
    params: list[torch.nn.Parameter]  # the trained ones (requires_grad)
    dtype: torch.dtype               # the images' dtype: the parameters'
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per epoch
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler | None  # fp16 on CUDA only


def build_parts(config: TrainConfig, device: torch.device,
                on_tile: Callable[[str, int, int], None]) -> TrainingParts:
    """Everything `config` asks for, on `device`; `on_tile` is the stream's progress hook.
    ValueError for CSVs, images or options that cannot work, all problems listed."""
    task = training_task(config)
    train_samples = read_label_csv(config.train_csv, task)
    labels = [s.label for s in train_samples]
    task.fit(labels)
    sampling = task.balance(config.balance, labels)  # --balance sampler
    val_samples = read_label_csv(config.val_csv, task) if config.val_csv else []
    model = _training_model(config, task, labels)
    tissue = training_tissue(config, model, train_samples + val_samples)
    _record_reading(model, config, tissue)
    freeze_batchnorm(model.stream, train_affine=config.train_bn_affine)
    largest = _check_all_images(config, model, train_samples, val_samples)
    tile_size, engine = (tile_for_budget(model, largest, config.memory_budget, config, device)
                         if config.memory_budget else (config.tile_size, config.engine))
    model.to(device)
    scnn = StreamingCNN(model.stream, tile_size, engine)
    model.config.tile_size = tile_size  # predict's default
    scnn.on_tile = on_tile
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params)
    chosen_amp = amp_dtype(device, config.amp_dtype)
    use_scaler = config.amp and device.type == "cuda" and chosen_amp == torch.float16
    return TrainingParts(
        config, device, task, train_samples, val_samples, sampling, model, tissue, scnn,
        params, params[0].dtype if params else torch.get_default_dtype(), optimizer,
        make_scheduler(config, optimizer), chosen_amp,
        torch.amp.GradScaler("cuda") if use_scaler else None)


def _training_model(config: TrainConfig, task: Task, labels: list) -> Classifier:
    """The model the options describe, its head prepared for the training labels."""
    model = build_model(
        ModelConfig(config.model, stream_layers=config.stream_layers, pooling=config.pooling,
                    attention_hidden=config.attention_hidden, dropout=config.dropout,
                    **task.model_fields()),
        weights=config.weights, pretrained=config.pretrained)
    task.prepare_model(model, labels)
    return model


def _record_reading(model: Classifier, config: TrainConfig, tissue: Tissue) -> None:
    """Keep in the model's config how training read its images: predict and saliency read
    them the same way (tissue, stain normalisation, level or mpp, crop)."""
    model.config.tissue = tissue.record
    model.config.stain_normalize = config.stain_normalize
    model.config.read = config.read_spec().record()


def _check_all_images(config: TrainConfig, model: Classifier, train_samples: list[Sample],
                      val_samples: list[Sample]) -> tuple[int, int]:
    """Both CSVs' images checked; the largest training (height, width)."""
    minimum = minimum_input_size(model)
    largest = check_images(train_samples, config, minimum, str(config.train_csv))
    check_images(val_samples, config, minimum, str(config.val_csv))
    return largest


def training_task(config: TrainConfig) -> Task:
    """The task the options ask for; its labels' details come from the training CSV."""
    if config.task == "regression":
        return Regression(loss_name=config.loss, standardise=config.standardise)
    return Classification(config.num_classes)


def training_tissue(config: TrainConfig, model: Classifier, samples: list[Sample]) -> Tissue:
    """What pooling runs over in training: `config.tissue`, or by default "auto" where it
    can (the whole-slide path) and "none" on the feature-map path, whose head pools its own
    output, not the stream's. ValueError where tissue masks and the path disagree."""
    whole_slide = training_path(model, config.whole_slide) == "whole-slide"
    with_files = [s for s in samples if s.mask is not None]
    if not whole_slide and (config.tissue == "auto" or with_files):
        what = "--tissue auto" if config.tissue == "auto" else \
            f"the mask column (line {with_files[0].row})"
        raise InputError(f"{what} needs the whole-slide path: a head that starts with global "
                         "pooling (no --stream-layers) and --whole-slide; or --tissue none "
                         "without masks")
    return Tissue(config.tissue or ("auto" if whole_slide else "none"))


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]
                   ) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.step_gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def check_images(samples: list[Sample], config: TrainConfig, minimum: int, what: str
                 ) -> tuple[int, int]:
    """Open every image before training starts; report all unreadable or too small ones.

    Returns the largest (height, width) met, the size a memory budget must hold."""
    problems, largest, spec = [], (0, 0), config.read_spec()
    for sample in samples:
        try:
            with open_image(sample.image) as slide:
                width, height = spec.resolve(slide, sample.mpp).size
        except ValueError as exc:
            problems.append(f"line {sample.row}: {exc}")
            continue
        if config.image_size is not None:
            height, width = config.image_size
        if min(height, width) < minimum:
            problems.append(f"line {sample.row}: {sample.image.name} is {width} x {height} "
                            f"pixels, smaller than the model's minimum {minimum} x {minimum}")
        largest = max(largest, (height, width), key=lambda hw: hw[0] * hw[1])
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 8 else "")
        raise InputError(f"{what}: {shown}")
    return largest


def tile_for_budget(model: Classifier, image_size: tuple[int, int], budget: str,
                    config: TrainConfig, device: torch.device = torch.device("cpu"),
                    ) -> tuple[int, str]:
    """(tile, engine): the largest tile (fastest) whose predicted training peak fits `budget`
    (e.g. "8GiB"), from the memory estimator, in the precision training will use on
    `device`. With engine "auto", the crop engine is tried where no tile fits the halo
    engine (it keeps no halo strips: less memory for small tiles on large images, more
    compute). ValueError naming the smallest peak when none fits."""
    candidates = [t for t in TILE_CANDIDATES if t <= min(image_size)] or [min(image_size)]
    dtype = amp_dtype(device, config.amp_dtype) if config.amp else torch.float32
    smallest = math.inf
    for engine in ("auto", "crop") if config.engine == "auto" else (config.engine,):
        estimate = estimate_training_memory(model.stream, model.head, image_size, candidates,
                                            dtype=dtype, optimizer=config.optimizer,
                                            engine=engine, whole_slide=config.whole_slide)
        row = largest_fitting_row(estimate, parse_bytes(budget))
        if row is not None:
            return int(row.tile_size[0]), engine
        streaming = [r for r in estimate.rows if r.mode == "streaming"]
        smallest = min(smallest, *(r.peak_bytes for r in streaming))
        if all(r.engine == "crop" for r in streaming):
            break  # "auto" already ran crops everywhere: the crop estimate would repeat it
    raise InputError(f"no tile fits the memory budget {budget} for {image_size[1]} x "
                     f"{image_size[0]} images (the smallest needs {smallest / 2**30:.2f} "
                     "GiB); raise the budget or stream fewer layers with --stream-layers")


def prepare_out_dir(out: Path, config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Create `out` and write config.json; refuse to start over a run without `overwrite`,
    or to resume where there is no last.pt."""
    if resume:
        if not (out / "last.pt").is_file():
            raise InputError(f"{out}: no last.pt to resume from")
    elif (out / "last.pt").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a training run (last.pt); use "
                              "--resume to continue it or --overwrite to start afresh")
    out.mkdir(parents=True, exist_ok=True)
    # on resume too: a changed --accumulate or --epochs holds for later resumes
    with atomic_output(out / "config.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2))


def write_tissue_previews(out: Path, parts: TrainingParts) -> Path | None:
    """The tissue masks of the first PREVIEW_SLIDES training slides drawn over them (PNG) in
    `out/tissue/`, for a person to check before a long run; None without masks."""
    folder = out / "tissue"
    written = None
    for sample in parts.train_samples[:PREVIEW_SLIDES]:
        with open_image(sample.image) as slide:
            mask = parts.tissue.mask_for(slide, sample.mask)
            if mask is None:
                continue
            folder.mkdir(exist_ok=True)
            write_preview(slide, mask, folder / f"line{sample.row}_{sample.image.stem}.png")
            written = folder
    return written
