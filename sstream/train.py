"""The training job: streaming training on image-level labels, with checkpoints and resume.

The labels are classes or continuous targets (`config.task`): a `sstream.task` object reads
them, gives the loss, the validation metrics and what `best.pt` keeps.

One image at a time goes through `StreamingCNN(model.stream)` (tile by tile) and the head;
`accumulate` images make one optimizer step (the paper's serial mini-batch). The next image is
read and prepared by a background thread while the current one trains.

Exact resume: everything random is either derived from (seed, epoch, position) — the data
order, crops and augmentations — or saved in the checkpoint (torch's RNG state, which the
head's dropout draws from). A checkpoint is taken at an optimizer-step boundary, so
interrupting and resuming gives the same weights as an uninterrupted run (on CPU).

Output directory: `config.json` (the resolved configuration), `last.pt`, `best.pt`,
`metrics.csv` (one row per epoch) and `curves.png`, each written atomically, and with
tensorboard installed `tensorboard/` (`sstream.scalar_log`); for
classification with a validation set, `val_confusion.png` and `val_roc.png` of best.pt's
validation.

Data parallel (under `torchrun`, see `sstream.distributed`): N ranks each stream their share
of every optimizer step's group of N x accumulate images and sum their gradients before the
step, which equals one process with accumulate = N x accumulate. `state.image_index` counts
images of the whole group, so a run resumes on any number of ranks. Rank 0 alone writes the
outputs and reports events; validation is sharded and its predictions gathered. Dropout
draws from each rank's own RNG (all saved in checkpoints), so with dropout N ranks are
statistically, not bitwise, equal to one process.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstream.data import Augmentation, PixelSource, Sample, read_label_csv
from sstream.distributed import DEFAULT_TIMEOUT_S, DataParallel
from sstream.engine import ENGINES, StreamingCNN
from sstream.engine.memory import estimate_training_memory, largest_fitting_row
from sstream.errors import SstreamError
from sstream.io import atomic_output, open_image
from sstream.models import (
    Classifier,
    ModelConfig,
    build_model,
    checkpoint_payload,
    freeze_batchnorm,
    minimum_input_size,
    model_outputs,
    read_checkpoint,
    seal,
    streamed_logits,
    training_path,
)
from sstream.options import ASSUME_MPP_HELP, DEVICE_HELP, Options, option
from sstream.plots import Panel, Series, line_plot
from sstream.reading import ReadSpec
from sstream.runtime import amp_dtype, autocast, parse_bytes, peak_memory_mb, reset_peak_memory
from sstream.scalar_log import ScalarLog
from sstream.stain import STAIN_NORMALISERS, HedJitter, chain, fit_normaliser
from sstream.task import LOSSES, TASKS, Classification, Regression, Task, selection_score
from sstream.tissue import TISSUE_CHOICES, Tissue, output_mask, write_preview

OPTIMIZERS = ("adamw", "sgd")
# Class balance: none (the cohort as it is: the default, so probabilities keep the cohort's
# prevalence and AUC, which best.pt follows, does not depend on it); sampler (each epoch
# draws its images with each class equally likely, as CLAM's --weighted_sample); loss
# (cross-entropy weighted by inverse class frequency, scikit-learn's "balanced" weights).
BALANCES = ("none", "sampler", "loss")
LOGS = ("tensorboard", "none")
# standard: flips, 90-degree turns, light colour jitter; stain: also HED jitter (sstream.stain)
AUGMENTS = ("standard", "stain", "none")
SCHEDULES = ("cosine", "step", "constant")
RUN_COLUMNS = ["lr", "seconds", "images_per_s", "tiles_per_s", "peak_memory_mb"]


class TrainingError(SstreamError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


class ResumeMismatch(SstreamError, ValueError):
    """A resumed run was given an option whose value differs from the saved one."""


@dataclass
class TrainConfig(Options):
    """Every option of `sstream train`: its default and its help (the CLI and config files
    fill this)."""

    train_csv: str = option("", "CSV with header image,label (paths relative to the CSV; "
                            "regression: label or label_<name> columns).")
    val_csv: str | None = option(None, "Validation CSV (same format).")
    out: str = option("runs/sstream", "Output directory.")
    model: str = option("tiny", "tiny, resnet18, resnet34, resnet50, convnext_tiny or vgg16.")
    task: str = option("classification", "classification (integer labels) or regression "
                       "(numbers; one target per label_<name> column).")
    num_classes: int | None = option(None, "Classes (default: 1 + largest label).")
    loss: str = option("mse", "Regression loss: mse, l1 or huber.")
    standardise: bool = option(True, "Regression: the loss sees targets scaled by the "
                               "training labels' mean and standard deviation (predictions "
                               "stay in the label's units).")
    stream_layers: str | None = option(None, "Stream up to this stage (e.g. layer3); the rest "
                                       "runs normally. Default: the whole trunk.")
    pooling: str = option("max", "Pooling of the head: max, avg, or attention (CLAM-SB's "
                          "gated attention, trained end to end, memory flat in the slide's "
                          "area).")
    attention_hidden: int = option(128, "Hidden size of the gated attention (--pooling "
                                   "attention).")
    dropout: float = option(0.0, "Dropout before the final linear layer.")
    weights: str | None = option(None, "torchvision-format state dict for the backbone (e.g. "
                                 "ImageNet weights downloaded beforehand).")
    pretrained: bool = option(False, "torchvision's ImageNet weights (needs network; fails "
                              "clearly offline).")
    train_bn_affine: bool = option(True, "Train BatchNorm weight/bias (statistics stay frozen "
                                   "either way).")
    level: int | None = option(None, "Pyramid level to read (0 = full resolution).")
    mpp: float | None = option(None, "Read every slide at exactly this many µm per pixel: the "
                               "finest level not coarser, resized (antialiased).")
    assume_mpp: float | None = option(None, ASSUME_MPP_HELP)
    image_size: tuple[int, int] | None = option(  # (height, width); None: the whole level
        None, "Crop or pad every image to this size (N or WxH; random crop in training, "
        "centre in validation).")
    augment: bool | str = option(  # True and False: the spelling before --augment stain
        "standard", "standard: flips, 90-degree rotations, light colour jitter; stain: also "
        "HED stain jitter (Tellez et al., drawn once per image); none. Seeded.")
    stain_normalize: str | None = option(
        None, "macenko or reinhard: normalise each slide's stain colours to a reference H&E, "
        "fitted on its thumbnail; predict and saliency do the same.", shown="none")
    optimizer: str = option("adamw", "adamw or sgd.")
    lr: float = option(1e-3, "Learning rate.")
    weight_decay: float = option(1e-4, "Weight decay.")
    momentum: float = option(0.9, "SGD momentum.")
    epochs: int = option(10, "Epochs.")
    schedule: str = option("cosine", "Learning-rate schedule: cosine, step or constant "
                           "(stepped per epoch).")
    step_size: int = option(10, "Epochs between decays (step schedule).")
    step_gamma: float = option(0.1, "Decay factor (step schedule).")
    accumulate: int = option(1, "Images per optimizer step and rank (serial mini-batch; the "
                             "step averages ranks x accumulate images).")
    amp: bool = option(False, "Mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU).")
    amp_dtype: str | None = option(None, "Force the AMP dtype: bf16 or fp16.")
    device: str = option("auto", DEVICE_HELP)
    seed: int = option(0, "Seed for order, crops, augmentation and init.")
    tile_size: int = option(512, "Tile side in input pixels (memory follows it).")
    memory_budget: str | None = option(
        None, "Choose the largest tile whose predicted peak fits, e.g. 8GiB (instead of "
        "--tile-size); with --engine auto, the crop engine where no halo tile fits.")
    engine: str = option("auto", "Streaming engine: auto (halos carried between tiles where "
                         "the stream allows it: fastest), halo or crop (keeps no halo strips: "
                         "less memory for small tiles on huge images).")
    whole_slide: bool = option(
        True, "With a pooling head (the whole trunk streamed), pool tile by tile: no feature "
        "map is kept and the backward re-runs only the tiles the gradient reaches, so memory "
        "does not grow with the slide. --no-whole-slide keeps the feature map (can be faster "
        "on small images whose maxima reach most tiles).")
    tissue: str | None = option(
        None, "auto: pool over tissue only, found on each slide's thumbnail (glass is neither "
        "read nor computed); none: every position. A CSV's mask column gives slides their "
        "own mask images. Check masks first with `sstream tissue`.",
        shown="auto with a pooling head, else none")
    dist_timeout: float = option(DEFAULT_TIMEOUT_S, "Under torchrun: seconds a rank waits for "
                                 "the others before the job stops.")
    balance: str = option("none", "Class imbalance: none (the cohort as it is; probabilities "
                          "keep its prevalence), sampler (each epoch draws classes equally "
                          "often) or loss (cross-entropy weighted by inverse class "
                          "frequency).")
    patience: int | None = option(None, "Stop after this many epochs without a better best.pt "
                                  "(its validation metric).", shown="off")
    min_epochs: int = option(0, "Never stop early before this many epochs.")
    log: str = option("tensorboard", "tensorboard: every epoch's metrics, losses, learning "
                      "rate, speed and memory in OUT/tensorboard (when tensorboard is "
                      "installed: pip install sstream[tensorboard]); none: only metrics.csv.")

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # the spelling of configs before --augment stain
            self.augment = "standard" if self.augment else "none"

    def validate(self) -> None:
        """Raise ValueError for options that cannot work together."""
        if not self.train_csv:
            raise ValueError("--train-csv is required")
        self.read_spec()
        checks = [
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.task in TASKS, f"--task must be one of {', '.join(TASKS)}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (self.task == "classification" or self.num_classes is None,
             "--num-classes is for classification; a regression model has one output per "
             "target column"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.accumulate >= 1, "--accumulate must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.tile_size >= 1, "--tile-size must be positive"),
            (self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}"),
            (self.dist_timeout > 0, "--dist-timeout must be positive"),
            (self.balance in BALANCES, f"--balance must be one of {', '.join(BALANCES)}"),
            (self.balance == "none" or self.task == "classification",
             "--balance is for classification"),
            (self.patience is None or self.patience >= 1, "--patience must be at least 1"),
            (self.min_epochs >= 0, "--min-epochs must be >= 0"),
            (self.log in LOGS, f"--log must be one of {', '.join(LOGS)}"),
            (self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}"),
            (self.stain_normalize in (None, *STAIN_NORMALISERS),
             f"--stain-normalize must be one of {', '.join(STAIN_NORMALISERS)}"),
            (self.step_size >= 1, "--step-size must be at least 1"),
            (self.tissue in (None, *TISSUE_CHOICES), "--tissue must be auto or none for "
             "training (a mask file belongs to one slide: give each slide its mask in the "
             "CSV's mask column)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def read_spec(self, tissue: str | None = None) -> ReadSpec:
        """How this run reads its images (ReadSpecError for options that cannot work)."""
        return ReadSpec(self.level, self.mpp, self.assume_mpp, self.image_size, tissue)


# ---- events (the CLI renders them; the library stays silent) ---------------------------------


class TrainEvents:
    """Hooks the training loop calls; override what you want to show. All no-ops here."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_epoch_start(self, epoch: int, epochs: int, images: int) -> None: ...
    def on_image(self, epoch: int, done: int, images: int, loss: float, tiles: int) -> None: ...
    def on_tile(self, phase: str, done: int, total: int) -> None: ...
    def on_validation(self, done: int, images: int) -> None: ...
    def on_epoch_end(self, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...


# Settings a resume may change: they do not alter what has been trained so far.
RESUMABLE_CHANGES = ("epochs", "device", "out", "accumulate", "dist_timeout", "patience",
                     "min_epochs", "log")


@dataclass
class TrainState:
    """Where training stands, saved with every checkpoint."""

    epoch: int = 0            # the epoch in progress (or the next one)
    image_index: int = 0      # images of this epoch (all ranks) used for completed steps
    step: int = 0             # optimizer steps taken
    best_score: list[float] = field(default_factory=lambda: [-math.inf] * 3)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    epoch_seconds: float = 0.0
    epoch_tiles: int = 0
    epochs_since_best: int = 0   # epochs ended since best.pt last improved


@dataclass
class TrainResult:
    out: Path
    state: TrainState
    interrupted: bool = False
    model: Classifier | None = None
    rank: int = 0             # this process's rank; only rank 0 wrote outputs
    stop_reason: str = ""     # why training ended: every epoch done, or early stopping


# ---- the pieces ---------------------------------------------------------------------------


def _generator(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator determined by the seed and the position (epoch, image...)."""
    return np.random.default_rng([seed, *keys])


def epoch_order(seed: int, epoch: int, count: int, weights: np.ndarray | None = None
                ) -> np.ndarray:
    """The order of the training images in `epoch`, the same on every resume: a
    permutation, or with `weights` (a probability per image, `--balance sampler`) `count`
    draws with replacement, so that each class is drawn equally often on average."""
    generator = _generator(seed, epoch, 0)
    if weights is None:
        return generator.permutation(count)
    return generator.choice(count, size=count, replace=True, p=weights)


# Images up to this many pixels are read whole (uint8, 3 bytes a pixel: 192 MiB) by the
# prefetch thread while the previous image trains; larger ones (whole slides) are read region
# by region as the tiles ask, so no image is ever whole in memory.
IN_MEMORY_PIXELS = 2**26


def load_training_image(sample: Sample, config: TrainConfig, train: bool,
                        seed_keys: tuple[int, ...], dtype: torch.dtype = torch.float32,
                        tissue: Tissue | None = None) -> PixelSource:
    """One image (resolution, crop/pad, augmentation: `config.read_spec()`) as a PixelSource
    of pixels / 255 in `dtype`: held as uint8 up to IN_MEMORY_PIXELS, else read lazily from
    the open slide (the source owns it: `close()` it when done). With `tissue`, the source
    carries the slide's tissue mask, and random crops are centred on a random tissue point."""
    generator = _generator(config.seed, *seed_keys)
    spec = config.read_spec(tissue.choice if tissue is not None else None)
    read = spec.open(sample, generator if train else None)
    try:
        augmentation = Augmentation.draw(generator) if (train and config.augment != "none") \
            else None
        stain = chain(  # per pixel, fixed per image: tiles see one transform
            fit_normaliser(config.stain_normalize, read.slide, read.resolution.level)
            if config.stain_normalize else None,
            HedJitter.draw(generator) if (train and config.augment == "stain") else None)
        region = read.source
        if region.height * region.width > IN_MEMORY_PIXELS:
            source = region.augmented(augmentation, dtype, read.slide)  # owns the slide now
        else:
            source = PixelSource.from_array(region.to_rgb_array(), augmentation, dtype=dtype,
                                            level0=region.level0)
            read.close()
    except BaseException:
        read.close()
        raise
    source.tissue = region.tissue
    source.stain = stain
    return source


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
        raise ValueError(f"{what} needs the whole-slide path: a head that starts with global "
                         "pooling (no --stream-layers) and --whole-slide; or --tissue none "
                         "without masks")
    return Tissue(config.tissue or ("auto" if whole_slide else "none"))


def _output_mask(source: PixelSource, scnn: StreamingCNN, sample: Sample
                 ) -> torch.Tensor | None:
    """`output_mask`, its errors naming the image and CSV line."""
    try:
        return output_mask(source, scnn)
    except ValueError as exc:
        raise ValueError(f"line {sample.row}: {sample.image.name}: {exc}") from None


def _make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]
                    ) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.step_gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _check_images(samples: list[Sample], config: TrainConfig, minimum: int, what: str
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
        raise ValueError(f"{what}: {shown}")
    return largest


TILE_CANDIDATES = (128, 256, 512, 1024, 2048, 4096, 8192)
PREVIEW_SLIDES = 4  # training slides whose tissue masks are drawn into out/tissue/


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
    raise ValueError(f"no tile fits the memory budget {budget} for {image_size[1]} x "
                     f"{image_size[0]} images (the smallest needs {smallest / 2**30:.2f} "
                     "GiB); raise the budget or stream fewer layers with --stream-layers")


def save_checkpoint(path: Path, model: Classifier, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler | None, state: TrainState,
                    config: TrainConfig, rng_state: torch.Tensor,
                    rank_rng_states: list[torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename).

    `rng_state` is rank 0's torch RNG state; `rank_rng_states` every rank's, when there are
    several (saved as `torch_rng_states`).
    """
    payload = checkpoint_payload(model)
    payload.update({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "train_state": asdict(state),
        "train_config": config.to_dict(),
        "torch_rng_state": rng_state,
    })
    if rank_rng_states is not None:
        payload["torch_rng_states"] = rank_rng_states
    buffer = io.BytesIO()
    torch.save(seal(payload), buffer)  # checked by every load: a damaged copy is refused
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_bytes(buffer.getvalue())


def metric_columns(task: Task) -> list[str]:
    """metrics.csv's columns: the losses, the task's validation metrics, then the run's."""
    return ["epoch", "train_loss", "val_loss", *(f"val_{m}" for m in task.metric_names),
            *RUN_COLUMNS]


def write_metrics(out: Path, history: list[dict[str, Any]], task: Task) -> None:
    """metrics.csv (one row per epoch) and curves.png, both rewritten atomically."""
    with atomic_output(out / "metrics.csv", overwrite=True) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=metric_columns(task),
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
    epochs = [row["epoch"] for row in history]

    def column(name: str) -> list[float | None]:
        return [row.get(name) for row in history]

    line_plot(out / "curves.png", [
        Panel("loss", [Series("train loss", epochs, column("train_loss")),
                       Series("val loss", epochs, column("val_loss"))], xlabel="epoch"),
        *(Panel(title, [Series(label, epochs, column(key)) for label, key in series],
                xlabel="epoch") for title, series in task.validation_panels()),
    ])


# ---- the job ------------------------------------------------------------------------------


class _Trainer:
    """Holds what one training run needs; `run()` is the loop."""

    def __init__(self, config: TrainConfig, events: TrainEvents, resume: bool,
                 overwrite: bool, should_stop: Callable[[], bool], parallel: DataParallel,
                 device: torch.device) -> None:
        torch.manual_seed(config.seed)  # before the model is built: its init is seeded too
        self.config, self.should_stop, self.parallel = config, should_stop, parallel
        self.events = events if parallel.is_main else TrainEvents()
        self.out = Path(config.out)
        self.device = device
        with parallel.agreement("while starting"):
            if parallel.is_main:
                self._prepare_out_dir(resume, overwrite)
            self._build(config)
            saved = (self.out / "last.pt").read_bytes() if resume and parallel.is_main else None
        self.state = TrainState()
        if parallel.distributed and not parallel.is_main:
            # dropout draws differ per rank; rank 0 keeps the single-process stream
            torch.manual_seed(_rank_seed(config.seed, parallel.rank))
        self.rng_at_step = torch.get_rng_state()
        if resume:
            saved = parallel.broadcast_object(saved, "sending last.pt to every rank")
            with parallel.agreement("while resuming"):
                self._restore(self.out / "last.pt", saved)
        parallel.broadcast_module(self.model)  # identical parameters on every rank
        with parallel.agreement("while writing tissue previews"):
            self.previews = self._write_tissue_previews() if parallel.is_main else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sstream-prefetch")
        self.scalars = (ScalarLog.open(self.out / "tensorboard", config.log)
                        if parallel.is_main else None)

    def _build(self, config: TrainConfig) -> None:
        self.task = training_task(config)
        self.train_samples = read_label_csv(config.train_csv, self.task)
        labels = [s.label for s in self.train_samples]
        self.task.fit(labels)
        self.sampling = self.task.balance(config.balance, labels)  # --balance sampler
        self.val_samples = (read_label_csv(config.val_csv, self.task)
                            if config.val_csv else [])
        self.model = build_model(
            ModelConfig(config.model, stream_layers=config.stream_layers,
                        pooling=config.pooling, attention_hidden=config.attention_hidden,
                        dropout=config.dropout,
                        **self.task.model_fields()),
            weights=config.weights, pretrained=config.pretrained)
        self.task.prepare_model(self.model, labels)
        self.tissue = training_tissue(config, self.model,
                                      self.train_samples + self.val_samples)
        self.model.config.tissue = self.tissue.record  # predict and saliency do the same
        self.model.config.stain_normalize = config.stain_normalize  # ... and this
        self.model.config.read = config.read_spec().record()  # and read as training did
        freeze_batchnorm(self.model.stream, train_affine=config.train_bn_affine)
        minimum = minimum_input_size(self.model)
        largest = _check_images(self.train_samples, config, minimum, str(config.train_csv))
        _check_images(self.val_samples, config, minimum, str(config.val_csv))
        tile_size, engine = (tile_for_budget(self.model, largest, config.memory_budget,
                                             config, self.device)
                             if config.memory_budget else (config.tile_size, config.engine))
        self.model.to(self.device)
        self.scnn = StreamingCNN(self.model.stream, tile_size, engine)
        self.model.config.tile_size = tile_size  # predict's default
        self.scnn.on_tile = self.events.on_tile
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.dtype = self.params[0].dtype if self.params else torch.get_default_dtype()
        self.optimizer = _make_optimizer(config, self.params)
        self.scheduler = _make_scheduler(config, self.optimizer)
        self.amp_dtype = amp_dtype(self.device, config.amp_dtype)
        use_scaler = config.amp and self.device.type == "cuda" and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def _write_tissue_previews(self) -> Path | None:
        """The tissue masks of the first PREVIEW_SLIDES training slides drawn over them
        (PNG) in `out/tissue/`, for a person to check before a long run; None without
        masks."""
        folder = self.out / "tissue"
        written = None
        for sample in self.train_samples[:PREVIEW_SLIDES]:
            with open_image(sample.image) as slide:
                mask = self.tissue.mask_for(slide, sample.mask)
                if mask is None:
                    continue
                folder.mkdir(exist_ok=True)
                write_preview(slide, mask, folder / f"line{sample.row}_{sample.image.stem}.png")
                written = folder
        return written

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        if resume:
            if not (self.out / "last.pt").is_file():
                raise ValueError(f"{self.out}: no last.pt to resume from")
        elif (self.out / "last.pt").exists() and not overwrite:
            raise FileExistsError(f"{self.out} already holds a training run (last.pt); use "
                                  "--resume to continue it or --overwrite to start afresh")
        self.out.mkdir(parents=True, exist_ok=True)
        # on resume too: a changed --accumulate or --epochs holds for later resumes
        with atomic_output(self.out / "config.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.config.to_dict(), indent=2))

    def _restore(self, path: Path, saved: bytes) -> None:
        payload = read_checkpoint(path, data=saved)
        previous = TrainConfig.from_dict(payload["train_config"])
        differing = [f.name for f in fields(TrainConfig)
                     if f.name not in RESUMABLE_CHANGES
                     and getattr(previous, f.name) != getattr(self.config, f.name)]
        if differing:
            raise ValueError(f"{path}: the run was started with other settings "
                             f"({', '.join(differing)}); resume with the saved config.json")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState(**payload["train_state"])
        rank = self.parallel.rank
        states = payload.get("torch_rng_states") or [payload["torch_rng_state"]]
        if rank < len(states):
            torch.set_rng_state(states[rank])
        else:  # more ranks than the run had: a fresh stream per (rank, step)
            torch.manual_seed(_rank_seed(self.config.seed, rank, self.state.step))
        self.rng_at_step = torch.get_rng_state()

    def _checkpoint(self, *names: str) -> None:
        """Write `names` (rank 0) with every rank's RNG state at the last step."""
        states = (self.parallel.gather_objects(self.rng_at_step, "saving a checkpoint")
                  if self.parallel.distributed else None)
        with self.parallel.agreement("while writing a checkpoint"):
            if self.parallel.is_main:
                for name in names:
                    path = self.out / name
                    save_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                    self.scaler, self.state, self.config, self.rng_at_step,
                                    states)
                    self.events.on_checkpoint(path)

    def _prefetch(self, epoch: int, order: np.ndarray, mine: list[int], position: int
                  ) -> Future | None:
        """Start loading this rank's `position`-th image of the epoch (None past the end)."""
        if position >= len(mine):
            return None
        index = mine[position]
        sample = self.train_samples[int(order[index])]
        return self.pool.submit(self._load_ahead, sample, (epoch, 1, index))

    def _load_ahead(self, sample: Sample, seed_keys: tuple[int, ...]) -> PixelSource:
        """(On the loading thread.) The next image, with the first regions of a lazily read
        slide already decoding: its tissue mask is made, and the regions its pooled forward
        will read are announced to the read-ahead, while the current image trains."""
        source = load_training_image(sample, self.config, True, seed_keys, self.dtype,
                                     self.tissue)
        if source.read_ahead and self.config.whole_slide and self.scnn.planned(source.shape):
            source.expect(self.scnn.pooled_reads(source.shape,
                                                 _output_mask(source, self.scnn, sample)))
        return source

    def run(self) -> TrainResult:
        config = self.config
        self.events.on_start({"out": str(self.out), "device": str(self.device),
                              "train_images": len(self.train_samples),
                              "val_images": len(self.val_samples), "tile_size":
                              self.scnn.tile_size, "engine": self.scnn.engine,
                              "geometry": self.scnn.geometry,
                              "path": training_path(self.model, config.whole_slide),
                              "tissue": self.tissue.choice,
                              "tissue_previews": self.previews and str(self.previews),
                              "resumed_at": (self.state.epoch, self.state.image_index),
                              "ranks": self.parallel.world_size,
                              "tensorboard": self.scalars and str(self.scalars.folder)})
        rank = self.parallel.rank
        try:
            for epoch in range(self.state.epoch, config.epochs):
                if self._patience_exhausted():
                    break
                if not self._train_epoch(epoch):
                    return TrainResult(self.out, self.state, interrupted=True, model=self.model,
                                       rank=rank)
                self._end_epoch(epoch)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            if self.scalars is not None:
                self.scalars.close()
        return TrainResult(self.out, self.state, model=self.model, rank=rank,
                           stop_reason=self._stop_reason())

    def _patience_exhausted(self) -> bool:
        """Early stopping: `--patience` epochs in a row without a better best.pt, once
        `--min-epochs` have run."""
        config, state = self.config, self.state
        return (config.patience is not None and state.epoch >= config.min_epochs
                and state.epochs_since_best >= config.patience)

    def _stop_reason(self) -> str:
        state = self.state
        best = state.epoch - state.epochs_since_best
        if self._patience_exhausted() and state.epoch < self.config.epochs:
            return (f"stopped early after epoch {state.epoch} of {self.config.epochs}: "
                    f"{state.epochs_since_best} epochs without a better best.pt (--patience "
                    f"{self.config.patience}); best.pt is epoch {best}")
        return f"{state.epoch} of {self.config.epochs} epochs done; best.pt is epoch {best}"

    def _train_epoch(self, epoch: int) -> bool:
        """Train one epoch from `state.image_index`; False when stopped (checkpoint saved).

        Positions in the epoch's order are cut into groups of `ranks x accumulate` (the last
        may be smaller), one optimizer step each; this rank trains `parallel.shard(group)`.
        """
        config, state, parallel = self.config, self.state, self.parallel
        order = epoch_order(config.seed, epoch, len(self.train_samples), self.sampling)
        count = len(order)
        group = parallel.world_size * config.accumulate
        starts = range(state.image_index, count, group)
        mine = [i for start in starts for i in parallel.shard(start, min(start + group, count))]
        self.events.on_epoch_start(epoch, config.epochs, count)
        self.model.train()
        reset_peak_memory(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        position = 0
        pending = self._prefetch(epoch, order, mine, position)
        started = time.perf_counter()
        for start in starts:
            stop = min(start + group, count)
            group_loss, group_tiles, stop_wanted, error = 0.0, 0, False, None
            try:
                for index in parallel.shard(start, stop):
                    source = pending.result()
                    position += 1
                    pending = self._prefetch(epoch, order, mine, position)
                    sample = self.train_samples[int(order[index])]
                    try:
                        loss = self._train_image(source, sample, stop - start)
                    finally:
                        source.close()
                    tiles = len(self.scnn.plan(source.shape))
                    group_loss, group_tiles = group_loss + loss, group_tiles + tiles
                    # (rank 0 reports: its group's other images are being done alongside)
                    self.events.on_image(epoch, min(index + parallel.world_size, stop),
                                         count, loss, tiles)
                    if index + parallel.world_size < stop and self.should_stop():
                        if not parallel.distributed:    # drop the partial group: back to the step
                            torch.set_rng_state(self.rng_at_step)
                            self._checkpoint("last.pt")
                            return False
                        stop_wanted = True              # ranks stop together, after this step
            except Exception as exc:
                if not parallel.distributed:
                    raise
                error = exc
            stop_wanted = self.should_stop() or stop_wanted
            where = f"at optimizer step {state.step + 1}"
            parallel.check(error, where)
            loss_sum, tiles_sum, stops = parallel.sum_values(
                [group_loss, group_tiles, stop_wanted], where)
            parallel.sum_gradients(self.params, where)
            self._step()
            state.image_index, state.step = stop, state.step + 1
            state.epoch_loss_sum += loss_sum
            state.epoch_tiles += int(tiles_sum)
            state.epoch_seconds += time.perf_counter() - started
            started = time.perf_counter()
            self.rng_at_step = torch.get_rng_state()
            if stops:
                self._checkpoint("last.pt")
                return False
        return True

    def _train_image(self, source: PixelSource, sample: Sample, group_size: int) -> float:
        """Forward and backward one image; gradients accumulate (loss / group size)."""
        mask = _output_mask(source, self.scnn, sample)
        with autocast(self.device, self.config.amp, self.amp_dtype):
            logits = streamed_logits(self.model, self.scnn, source, mask,  # (1, classes)
                                     whole_slide=self.config.whole_slide)
        # at least float32 for the loss (float64 models stay float64)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = self.task.loss(logits, [sample.label])
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at optimizer step "
                                f"{self.state.step}; stopped, keeping the last good checkpoint "
                                "(lower --lr, or try without --amp)")
        scaled = loss / group_size
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return float(loss.item())

    def _step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self, epoch: int) -> None:
        state = self.state
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        count = len(self.train_samples)
        row: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": state.epoch_loss_sum / count, "lr": lr,
            "seconds": round(state.epoch_seconds, 2),
            "images_per_s": count / max(state.epoch_seconds, 1e-9),
            "tiles_per_s": state.epoch_tiles / max(state.epoch_seconds, 1e-9),
        }
        if self.val_samples:
            metrics = self.validate()
            row.update({f"val_{k}": v for k, v in metrics.items()})
        row["peak_memory_mb"] = round(peak_memory_mb(self.device), 1)
        state.history.append(row)
        state.epoch, state.image_index = epoch + 1, 0
        state.epoch_loss_sum = state.epoch_seconds = 0.0
        state.epoch_tiles = 0
        improved = selection_score(row, self.task) > state.best_score
        if improved:
            state.best_score = selection_score(row, self.task)
        state.epochs_since_best = 0 if improved else state.epochs_since_best + 1
        self.rng_at_step = torch.get_rng_state()
        self._checkpoint("last.pt", *(["best.pt"] if improved else []))
        with self.parallel.agreement("while writing metrics"):
            if self.parallel.is_main:
                write_metrics(self.out, state.history, self.task)
                if improved and self.val_samples:  # the figures of best.pt's validation
                    self.task.write_figures(self.out / "val_", *self.validation)
                if self.scalars is not None:
                    self.scalars.add_epoch(row)
        self.events.on_epoch_end(row)

    def validate(self) -> dict[str, float]:
        """Streaming forward on the validation set: the task's metrics and loss.

        Each rank predicts its shard; the metrics are computed from all predictions.
        """
        self.model.eval()
        mine = self.parallel.shard(0, len(self.val_samples))
        predicted = []  # (position in the CSV, prediction, label)
        with self.parallel.agreement("during validation"):
            for done, index in enumerate(mine, start=1):
                sample = self.val_samples[index]
                source = load_training_image(sample, self.config, False, (), self.dtype,
                                             self.tissue)
                try:
                    outputs = model_outputs(
                        self.model, self.scnn, source, self.config.amp, self.amp_dtype,
                        _output_mask(source, self.scnn, sample))
                finally:
                    source.close()
                predicted.append((index, self.task.predictions(outputs), sample.label))
                self.events.on_validation(done, len(mine))
        self.model.train()
        gathered = self.parallel.gather_objects(predicted, "gathering validation results")
        merged = sorted((row for rows in gathered for row in rows), key=lambda row: row[0])
        self.validation = (np.stack([row[1] for row in merged]), [row[2] for row in merged])
        return self.task.metrics(*self.validation)


def _rank_seed(seed: int, rank: int, *keys: int) -> int:
    """A torch seed for rank > 0's own RNG stream (dropout), from (seed, rank, ...)."""
    return int(np.random.SeedSequence([seed, rank, *keys]).generate_state(1)[0])


def train(config: TrainConfig, events: TrainEvents | None = None, resume: bool = False,
          overwrite: bool = False, should_stop: Callable[[], bool] = lambda: False
          ) -> TrainResult:
    """Train as configured; see the module docstring for the outputs.

    `should_stop` is polled after every image: when it returns True, training stops at the
    last completed optimizer step, writes last.pt and returns with `interrupted=True`. With
    several ranks (WORLD_SIZE > 1, as torchrun sets it), they stop together after the
    current step.

    Raises:
        ValueError: bad options, CSVs or images (all problems listed), or an incompatible
            resume. FileExistsError: `out` holds a run and neither resume nor overwrite.
        TrainingError: the loss became NaN or infinite (last good checkpoint kept).
        RankFailure: another rank failed (its message is included) or stopped answering.
    """
    config.validate()
    parallel, device = DataParallel.from_env(config.device, config.dist_timeout)
    try:
        return _Trainer(config, events or TrainEvents(), resume, overwrite, should_stop,
                        parallel, device).run()
    finally:
        parallel.close()


PATH_SETTINGS = ("train_csv", "val_csv", "out", "weights")


def resume_config(out: str | Path, given: dict[str, Any] | None = None) -> TrainConfig:
    """The saved configuration of the run in `out`, continued with the options a command
    gives (`given`: TrainConfig field -> value).

    The same command run again with `--resume` is accepted: options in RESUMABLE_CHANGES
    (epochs, device, accumulate, dist_timeout) replace the saved values; every other option
    given must be the saved one (paths compared resolved), and `out`, if given, the run
    directory itself. ResumeMismatch (a ValueError) listing each option that differs, with
    the saved value and the given one; ValueError where `out` holds no run.
    """
    path = Path(out) / "config.json"
    if not path.is_file():
        raise ValueError(f"{out}: not a training directory (no config.json)")
    saved = TrainConfig.from_dict(json.loads(path.read_text()))
    changes, differing = {}, []
    for name, value in (given or {}).items():
        kept = str(out) if name == "out" else getattr(saved, name)
        if name in RESUMABLE_CHANGES and name != "out":
            changes[name] = value
        elif not _same_setting(name, kept, value):
            differing.append(f"--{name.replace('_', '-')} was {_shown(kept)}, now "
                             f"{_shown(value)}")
    if differing:
        raise ResumeMismatch(f"--resume {out}: the run was started with other settings: "
                         f"{'; '.join(differing)} (only --epochs, --device, --accumulate and "
                         "--dist-timeout may change)")
    return TrainConfig.from_dict({**saved.to_dict(), **changes, "out": str(out)})


def _same_setting(name: str, saved: Any, given: Any) -> bool:
    if name in PATH_SETTINGS and saved is not None and given is not None:
        return Path(saved).resolve() == Path(given).resolve()
    if isinstance(saved, (tuple, list)) and isinstance(given, (tuple, list)):
        return tuple(saved) == tuple(given)
    return saved == given


def _shown(value: Any) -> str:
    return "not set" if value is None else str(value)
