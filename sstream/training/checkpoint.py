"""Checkpoints and resume: what a checkpoint holds, writing it, restoring it, and the one
check that a resumed run continues the saved one.

A checkpoint is taken at an optimizer-step boundary and holds the model, optimizer, schedule,
AMP scaler, `TrainState`, the configuration, and torch's RNG state as it was after the last
step (every rank's, with several), so a resumed run draws its dropout exactly as the
uninterrupted one would have.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sstream.distributed import DataParallel
from sstream.errors import InputError
from sstream.io import atomic_output
from sstream.models import Classifier, checkpoint_payload, read_checkpoint, seal
from sstream.options import Options
from sstream.training.reporting import TrainEvents

if TYPE_CHECKING:
    from sstream.train import TrainConfig
    from sstream.training.setup import TrainingParts

# Settings a resume may change: they do not alter what has been trained so far.
RESUMABLE_CHANGES = ("epochs", "device", "out", "accumulate", "dist_timeout", "patience",
                     "min_epochs", "log")
PATH_SETTINGS = ("train_csv", "val_csv", "out", "weights")  # compared as resolved paths


class ResumeMismatch(InputError):
    """A resumed run was given an option whose value differs from the saved one."""


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

    def add_step(self, image_index: int, loss_sum: float, tiles: int, seconds: float) -> None:
        """An optimizer step was taken over the epoch's images up to `image_index`."""
        self.image_index, self.step = image_index, self.step + 1
        self.epoch_loss_sum += loss_sum
        self.epoch_tiles += tiles
        self.epoch_seconds += seconds

    def end_epoch(self, row: dict[str, Any], score: list[float]) -> bool:
        """Keep the epoch's `row` and start the next epoch; True when `score` (the task's
        selection score) beats the best so far, which it then is."""
        self.history.append(row)
        self.epoch, self.image_index = row["epoch"], 0
        self.epoch_loss_sum = self.epoch_seconds = 0.0
        self.epoch_tiles = 0
        improved = score > self.best_score
        if improved:
            self.best_score = score
        self.epochs_since_best = 0 if improved else self.epochs_since_best + 1
        return improved


def check_resume(saved: Options, given: Mapping[str, Any], out: str | Path
                 ) -> dict[str, Any]:
    """The one resume check: the options `given` (field -> value) to the run saved as
    `saved` in `out` must be the saved ones, except those in RESUMABLE_CHANGES, which are
    returned as the changes to make; `out`, if given, must be the run directory itself;
    paths are compared resolved. ResumeMismatch (a ValueError) listing each option that
    differs, with the saved value and the given one."""
    changes, differing = {}, []
    for name, value in given.items():
        kept = str(out) if name == "out" else getattr(saved, name)
        if name in RESUMABLE_CHANGES and name != "out":
            changes[name] = value
        elif not _same_setting(name, kept, value):
            differing.append(f"--{name.replace('_', '-')} was {_shown(kept)}, now "
                             f"{_shown(value)}")
    if differing:
        may_change = [f"--{name.replace('_', '-')}" for name in RESUMABLE_CHANGES
                      if name != "out"]
        raise ResumeMismatch(f"--resume {out}: the run was started with other settings: "
                             f"{'; '.join(differing)} (only {', '.join(may_change[:-1])} "
                             f"and {may_change[-1]} may change)")
    return changes


def _same_setting(name: str, saved: Any, given: Any) -> bool:
    if name in PATH_SETTINGS and saved is not None and given is not None:
        return Path(saved).resolve() == Path(given).resolve()
    if isinstance(saved, (tuple, list)) and isinstance(given, (tuple, list)):
        return tuple(saved) == tuple(given)
    return saved == given


def _shown(value: Any) -> str:
    return "not set" if value is None else str(value)


def rank_seed(seed: int, rank: int, *keys: int) -> int:
    """A torch seed for rank > 0's own RNG stream (dropout), from (seed, rank, ...)."""
    return int(np.random.SeedSequence([seed, rank, *keys]).generate_state(1)[0])


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


class Checkpoints:
    """A run's last.pt and best.pt, and torch's RNG state after the last optimizer step
    (what a checkpoint saves, and where an interrupted step's draws are rewound to)."""

    def __init__(self, out: Path, parts: TrainingParts, parallel: DataParallel,
                 events: TrainEvents) -> None:
        self.out, self.parts, self.parallel, self.events = out, parts, parallel, events
        self.rng_at_step = torch.get_rng_state()

    def mark_step(self) -> None:
        """An optimizer step ended: a checkpoint from now on continues from here."""
        self.rng_at_step = torch.get_rng_state()

    def rewind_to_step(self) -> None:
        """Undo the RNG draws of a partial step (its images are trained again on resume)."""
        torch.set_rng_state(self.rng_at_step)

    def save(self, state: TrainState, *names: str) -> None:
        """Write `names` (rank 0) with every rank's RNG state at the last step."""
        parallel, parts = self.parallel, self.parts
        states = (parallel.gather_objects(self.rng_at_step, "saving a checkpoint")
                  if parallel.distributed else None)
        with parallel.agreement("while writing a checkpoint"):
            if parallel.is_main:
                for name in names:
                    path = self.out / name
                    save_checkpoint(path, parts.model, parts.optimizer, parts.scheduler,
                                    parts.scaler, state, parts.config, self.rng_at_step,
                                    states)
                    self.events.on_checkpoint(path)

    def restore(self, path: Path, saved: bytes) -> TrainState:
        """Load the checkpoint `saved` (the bytes of `path`) into the run's parts and this
        rank's RNG; its state. ResumeMismatch where the run's options are not the saved
        ones (`check_resume`)."""
        parts, rank = self.parts, self.parallel.rank
        payload = read_checkpoint(path, data=saved)
        config = parts.config
        check_resume(type(config).from_dict(payload["train_config"]), config.to_dict(),
                     config.out)
        parts.model.load_state_dict(payload["model"])
        parts.optimizer.load_state_dict(payload["optimizer"])
        parts.scheduler.load_state_dict(payload["scheduler"])
        if parts.scaler is not None and payload.get("scaler"):
            parts.scaler.load_state_dict(payload["scaler"])
        state = TrainState(**payload["train_state"])
        states = payload.get("torch_rng_states") or [payload["torch_rng_state"]]
        if rank < len(states):
            torch.set_rng_state(states[rank])
        else:  # more ranks than the run had: a fresh stream per (rank, step)
            torch.manual_seed(rank_seed(config.seed, rank, state.step))
        self.rng_at_step = torch.get_rng_state()
        return state
