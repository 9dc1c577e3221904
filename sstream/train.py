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

The pieces live in `sstream.training`: `setup` builds the run's parts from the options,
`checkpoint` writes and restores checkpoints (with the one resume check), `steps` is the
step loop, `validation` the validation pass and `reporting` the events and metrics files.
This module holds the options (`TrainConfig`) and composes the pieces into a run (`_Run`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sstream.distributed import DEFAULT_TIMEOUT_S, DataParallel
from sstream.engine import ENGINES
from sstream.errors import InputError, first_line
from sstream.models import Classifier
from sstream.options import ASSUME_MPP_HELP, DEVICE_HELP, Options, option
from sstream.reading import ReadSpec
from sstream.runtime import peak_memory_mb
from sstream.scalar_log import ScalarLog
from sstream.stain import STAIN_NORMALISERS
from sstream.task import LOSSES, TASKS, selection_score
from sstream.tissue import TISSUE_CHOICES
from sstream.training.checkpoint import (
    RESUMABLE_CHANGES,
    Checkpoints,
    ResumeMismatch,
    TrainState,
    check_resume,
    rank_seed,
)
from sstream.training.images import epoch_order, load_training_image
from sstream.training.reporting import (
    TrainEvents,
    epoch_row,
    start_info,
    stop_reason,
    write_metrics,
)
from sstream.training.setup import (
    TILE_CANDIDATES,
    TrainingParts,
    build_parts,
    prepare_out_dir,
    tile_for_budget,
    write_tissue_previews,
)
from sstream.training.steps import StepLoop, TrainingError
from sstream.training.validation import validate

__all__ = ["RESUMABLE_CHANGES", "TILE_CANDIDATES", "ResumeMismatch", "TrainConfig",
           "TrainEvents", "TrainResult", "TrainState", "TrainingError", "epoch_order",
           "load_training_image", "resume_config", "tile_for_budget", "train"]

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
            raise InputError("--train-csv is required")
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
                raise InputError(message)

    def read_spec(self, tissue: str | None = None) -> ReadSpec:
        """How this run reads its images (ReadSpecError for options that cannot work)."""
        return ReadSpec(self.level, self.mpp, self.assume_mpp, self.image_size, tissue)


@dataclass
class TrainResult:
    out: Path
    state: TrainState
    interrupted: bool = False
    model: Classifier | None = None
    rank: int = 0             # this process's rank; only rank 0 wrote outputs
    stop_reason: str = ""     # why training ended: every epoch done, or early stopping


# ---- the job ------------------------------------------------------------------------------


class _Run:
    """One training run: its parts built (and restored on resume), then epochs of optimizer
    steps, each epoch closed by validation, checkpoints and reports."""

    def __init__(self, config: TrainConfig, events: TrainEvents, resume: bool,
                 overwrite: bool, should_stop: Callable[[], bool], parallel: DataParallel,
                 device: torch.device) -> None:
        torch.manual_seed(config.seed)  # before the model is built: its init is seeded too
        self.config, self.parallel = config, parallel
        self.events = events if parallel.is_main else TrainEvents()
        self.out = Path(config.out)
        with parallel.agreement("while starting"):
            if parallel.is_main:
                prepare_out_dir(self.out, config, resume, overwrite)
            self.parts: TrainingParts = build_parts(config, device, self.events.on_tile)
            saved = (self.out / "last.pt").read_bytes() if resume and parallel.is_main else None
        self.state = TrainState()
        if parallel.distributed and not parallel.is_main:
            # dropout draws differ per rank; rank 0 keeps the single-process stream
            torch.manual_seed(rank_seed(config.seed, parallel.rank))
        self.checkpoints = Checkpoints(self.out, self.parts, parallel, self.events)
        if resume:
            saved = parallel.broadcast_object(saved, "sending last.pt to every rank")
            with parallel.agreement("while resuming"):
                self.state = self.checkpoints.restore(self.out / "last.pt", saved)
        parallel.broadcast_module(self.parts.model)  # identical parameters on every rank
        with parallel.agreement("while writing tissue previews"):
            self.previews = (write_tissue_previews(self.out, self.parts) if parallel.is_main
                             else None)
        self.steps = StepLoop(self.parts, parallel, self.events, self.checkpoints, should_stop)
        self.scalars = (ScalarLog.open(self.out / "tensorboard", config.log)
                        if parallel.is_main else None)

    def run(self) -> TrainResult:
        config, model, rank = self.config, self.parts.model, self.parallel.rank
        self.events.on_start(start_info(
            self.parts, self.out, self.state, self.parallel.world_size, self.previews,
            self.scalars and self.scalars.folder))
        try:
            for epoch in range(self.state.epoch, config.epochs):
                if self._patience_exhausted():
                    break
                if not self.steps.train_epoch(epoch, self.state):
                    return TrainResult(self.out, self.state, interrupted=True, model=model,
                                       rank=rank)
                self._end_epoch(epoch)
        finally:
            self.steps.close()
            if self.scalars is not None:
                self.scalars.close()
        return TrainResult(self.out, self.state, model=model, rank=rank, stop_reason=stop_reason(
            self.state, config.epochs, config.patience, self._patience_exhausted()))

    def _patience_exhausted(self) -> bool:
        """Early stopping: `--patience` epochs in a row without a better best.pt, once
        `--min-epochs` have run."""
        config, state = self.config, self.state
        return (config.patience is not None and state.epoch >= config.min_epochs
                and state.epochs_since_best >= config.patience)

    def _end_epoch(self, epoch: int) -> None:
        """Step the schedule, validate, write last.pt (and best.pt when the validation is
        the best yet), metrics.csv, curves and tensorboard, and report the epoch."""
        parts, state = self.parts, self.state
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scheduler.step()
        row = epoch_row(epoch, state, lr, len(parts.train_samples))
        validation = validate(parts, self.parallel, self.events) if parts.val_samples else None
        if validation is not None:
            row.update({f"val_{k}": v for k, v in validation.metrics.items()})
        row["peak_memory_mb"] = round(peak_memory_mb(parts.device), 1)
        improved = state.end_epoch(row, selection_score(row, parts.task))
        self.checkpoints.mark_step()
        self.checkpoints.save(state, "last.pt", *(["best.pt"] if improved else []))
        with self.parallel.agreement("while writing metrics"):
            if self.parallel.is_main:
                write_metrics(self.out, state.history, parts.task)
                if improved and validation is not None:  # the figures of best.pt's validation
                    parts.task.write_figures(self.out / "val_", validation.predictions,
                                             validation.labels)
                if self.scalars is not None:
                    self.scalars.add_epoch(row)
        self.events.on_epoch_end(row)


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
        return _Run(config, events or TrainEvents(), resume, overwrite, should_stop,
                    parallel, device).run()
    finally:
        parallel.close()


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
        raise InputError(f"{out}: not a training directory (no config.json)")
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable run configuration ({first_line(exc)})"
                         ) from None
    changes = check_resume(saved, given or {}, out)
    return TrainConfig.from_dict({**saved.to_dict(), **changes, "out": str(out)})
