"""What a run reports: events for the caller to render (the library stays silent), each
epoch's row of numbers, and metrics.csv with curves.png made from the rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sstream.io import atomic_output
from sstream.models import training_path
from sstream.plots import Panel, Series, line_plot
from sstream.task import Task

if TYPE_CHECKING:
    from sstream.training.checkpoint import TrainState
    from sstream.training.setup import TrainingParts

RUN_COLUMNS = ["lr", "seconds", "images_per_s", "tiles_per_s", "peak_memory_mb"]


class TrainEvents:
    """Hooks the training loop calls; override what you want to show. All no-ops here."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_epoch_start(self, epoch: int, epochs: int, images: int) -> None: ...
    def on_image(self, epoch: int, done: int, images: int, loss: float, tiles: int) -> None: ...
    def on_tile(self, phase: str, done: int, total: int) -> None: ...
    def on_validation(self, done: int, images: int) -> None: ...
    def on_epoch_end(self, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...


def start_info(parts: TrainingParts, out: Path, state: TrainState, ranks: int,
               previews: Path | None, tensorboard: Path | None) -> dict[str, Any]:
    """What `TrainEvents.on_start` is told: where the run writes, on what, how it streams."""
    return {"out": str(out), "device": str(parts.device),
            "train_images": len(parts.train_samples), "val_images": len(parts.val_samples),
            "tile_size": parts.scnn.tile_size, "engine": parts.scnn.engine,
            "geometry": parts.scnn.geometry,
            "path": training_path(parts.model, parts.config.whole_slide),
            "tissue": parts.tissue.choice, "tissue_previews": previews and str(previews),
            "resumed_at": (state.epoch, state.image_index), "ranks": ranks,
            "tensorboard": tensorboard and str(tensorboard)}


def epoch_row(epoch: int, state: TrainState, lr: float, images: int) -> dict[str, Any]:
    """The training half of an epoch's metrics.csv row (validation and memory follow)."""
    seconds = max(state.epoch_seconds, 1e-9)
    return {"epoch": epoch + 1, "train_loss": state.epoch_loss_sum / images, "lr": lr,
            "seconds": round(state.epoch_seconds, 2), "images_per_s": images / seconds,
            "tiles_per_s": state.epoch_tiles / seconds}


def stop_reason(state: TrainState, epochs: int, patience: int | None, stopped_early: bool
                ) -> str:
    """Why training ended, and which epoch best.pt is, for the run's last line."""
    best = state.epoch - state.epochs_since_best
    if stopped_early and state.epoch < epochs:
        return (f"stopped early after epoch {state.epoch} of {epochs}: "
                f"{state.epochs_since_best} epochs without a better best.pt (--patience "
                f"{patience}); best.pt is epoch {best}")
    return f"{state.epoch} of {epochs} epochs done; best.pt is epoch {best}"


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
