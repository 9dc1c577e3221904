"""Training curves for TensorBoard: every epoch's row of metrics.csv as scalars.

`tensorboard --logdir runs/` then shows every run under `runs/` side by side. Written by
torch's SummaryWriter, which needs the `tensorboard` package (`pip install
sstream[tensorboard]`); without it `ScalarLog.open` returns None and training goes on.

Tags: `loss/train`, `loss/val`, `val/<metric>` (every validation metric), `lr`,
`speed/images_per_s`, `speed/tiles_per_s`, `memory/peak_mb`; the step is the epoch (1-based).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "lr": "lr",
        "images_per_s": "speed/images_per_s", "tiles_per_s": "speed/tiles_per_s",
        "peak_memory_mb": "memory/peak_mb"}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class ScalarLog:
    """A TensorBoard event file in `folder`; `add_epoch` writes one metrics.csv row."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    @classmethod
    def open(cls, folder: Path, choice: str) -> ScalarLog | None:
        """A log in `folder` when `choice` is "tensorboard" and tensorboard is installed."""
        if choice != "tensorboard" or not tensorboard_available():
            return None
        return cls(folder)

    def add_epoch(self, row: dict[str, Any]) -> None:
        """Every number of the row (but the epoch, which is the step), then flush, so the
        curves are current while training runs."""
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            tag = TAGS.get(key) or (f"val/{key[4:]}" if key.startswith("val_") else key)
            self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
