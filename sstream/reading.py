"""How slides are read for a model: one `ReadSpec`, one `open`, alike in every job.

Train, predict, saliency and verify all read a slide the same way: open it, resolve the
resolution (a pyramid level as it is, or exactly `mpp` µm per pixel: `sstream.io.resample`),
fit the window (crop or pad to `image_size`: random in training, centred otherwise), and
present it lazily as a `PixelSource` that carries the slide's tissue mask. `ReadSpec` holds
those choices and checks them in one place; `ReadSpec.open` does the reading.

A checkpoint records the spec its training read with (`ModelConfig.read`, and the tissue
choice in `ModelConfig.tissue`); `ReadSpec.for_model` gives it back, so predict and saliency
read as training did unless told otherwise, and `notes` says in one line where an explicit
option departs from it. Checkpoints from before the record read level 0, whole, as they did.

`model_input` gives what predict hands the model for one slide (pixels and tissue mask), so
a loaded model's plain `model(x, mask=mask)` reproduces predict's outputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstream.data import Box, PixelSource, Sample, fit_window
from sstream.engine import StreamingCNN
from sstream.errors import InputError
from sstream.io import SlideImage, open_image
from sstream.io.prefetch import DEFAULT_READ_AHEAD
from sstream.io.resample import ResampledLevel, Resolution, resolve_read
from sstream.models import Classifier, ModelConfig
from sstream.tissue import Tissue, output_mask

__all__ = ["ModelInput", "ReadSpec", "ReadSpecError", "SlideRead", "model_input"]

RECORDED = ("level", "mpp", "image_size")  # what a checkpoint keeps of the spec


class ReadSpecError(InputError):
    """Read options that cannot work together (the CLI answers them as usage errors)."""


@dataclass(frozen=True)
class ReadSpec:
    """How to read slides for a model.

    Attributes:
        level: the pyramid level to read as it is; None with `mpp` None: level 0.
        mpp: read at exactly this many µm per pixel (resampled from the finest level not
            coarser; see `sstream.io.resample`). Not with `level`.
        assume_mpp: level 0's µm per pixel for slides that state none (a CSV's `mpp` column
            gives each slide its own).
        image_size: (height, width) to crop or pad every image to; None: the whole image.
        tissue: "auto", "none" or a mask file (`sstream.tissue`); None: no mask.
    """

    level: int | None = None
    mpp: float | None = None
    assume_mpp: float | None = None
    image_size: tuple[int, int] | None = None
    tissue: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.level is None or self.mpp is None, "give --level or --mpp, not both"),
            (self.level is None or self.level >= 0, "--level must be >= 0"),
            (self.mpp is None or (math.isfinite(self.mpp) and self.mpp > 0),
             "--mpp must be a positive number of µm per pixel"),
            (self.assume_mpp is None or (math.isfinite(self.assume_mpp)
                                         and self.assume_mpp > 0),
             "--assume-mpp must be a positive number of µm per pixel"),
            (self.image_size is None or min(self.image_size) >= 1,
             "--image-size must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ReadSpecError(message)
        if self.image_size is not None:
            object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))

    # ---- records ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["image_size"] = list(self.image_size) if self.image_size else None
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReadSpec:
        """Inverse of `to_dict` (or of `record`); unknown keys raise ReadSpecError."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ReadSpecError(f"unknown read settings {', '.join(unknown)}")
        values = dict(values)
        if values.get("image_size") is not None:
            values["image_size"] = tuple(values["image_size"])
        return cls(**values)

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps (`ModelConfig.read`): the resolution and image size. The
        tissue choice has its own field; `assume_mpp` belongs to the slides, not the model."""
        return {name: value for name, value in self.to_dict().items() if name in RECORDED}

    @classmethod
    def for_model(cls, config: ModelConfig) -> ReadSpec:
        """How the model was trained to read (level 0, whole, for checkpoints from before
        the record), with its tissue choice."""
        return cls.from_dict({**(config.read or {}), "tissue": config.tissue})

    def overridden(self, level: int | None = None, mpp: float | None = None,
                   image_size: tuple[int, int] | None = None, tissue: str | None = None,
                   assume_mpp: float | None = None) -> ReadSpec:
        """This spec with the options given (None: keep). A level or an mpp replaces both."""
        if level is not None and mpp is not None:
            raise ReadSpecError("give --level or --mpp, not both")
        changes: dict[str, Any] = {}
        if level is not None or mpp is not None:
            changes.update(level=level, mpp=mpp)
        for name, value in (("image_size", image_size), ("tissue", tissue),
                            ("assume_mpp", assume_mpp)):
            if value is not None:
                changes[name] = value
        return replace(self, **changes)

    @property
    def resolution_text(self) -> str:
        """"0.5 µm/px", "level 1" or "level 0"."""
        return f"{self.mpp:g} µm/px" if self.mpp is not None else f"level {self.level or 0}"

    def notes(self, trained: ReadSpec) -> list[str]:
        """One line per way this spec reads differently from `trained` (the model's)."""
        notes = []
        if (self.level or 0, self.mpp) != (trained.level or 0, trained.mpp):
            notes.append(f"model trained at {trained.resolution_text}, reading at "
                         f"{self.resolution_text}")
        if self.image_size != trained.image_size:
            notes.append(f"model trained on {_size_text(trained.image_size)}, reading "
                         f"{_size_text(self.image_size)}")
        if (self.tissue or "none") != (trained.tissue or "none"):
            notes.append(f"model trained pooling over tissue {trained.tissue or 'none'}, "
                         f"pooling over tissue {self.tissue}")
        return notes

    # ---- reading ------------------------------------------------------------------------

    def resolve(self, slide: SlideImage, slide_mpp: float | None = None) -> Resolution:
        """The level read and its scale for this slide (`slide_mpp`: the CSV's value for a
        slide that states none; else `assume_mpp`)."""
        return resolve_read(slide, self.level, self.mpp, slide_mpp or self.assume_mpp)

    def open(self, image: Sample | str | Path, generator: np.random.Generator | None = None,
             read_ahead: int = DEFAULT_READ_AHEAD) -> SlideRead:
        """Open the slide, resolve the read, fit the window and find the tissue.

        `generator` draws a random window (training; centred on a random tissue point where
        the slide has a mask), else the window is centred. The SlideRead's source reads
        lazily; close the SlideRead (or use it as a context manager) when done.

        Raises:
            ImageReadError: an unreadable slide, or `mpp` for one that states no resolution.
            ReadSpecError: a level the slide lacks. ValueError: a bad tissue choice or mask.
        """
        sample = image if isinstance(image, Sample) else Sample(Path(image), None, 0)
        slide = open_image(sample.image)
        try:
            resolution = self.resolve(slide, sample.mpp)
            level = ResampledLevel(slide, resolution)
            tissue = Tissue.parse(self.tissue, "none").mask_for(slide, sample.mask)
            point = None if tissue is None or generator is None else \
                tissue.random_point(generator)
            around = None if point is None else level.from_level0(point[1], point[0])
            window = fit_window(level.height, level.width, self.image_size,
                                "center" if generator is None else "random", generator, around)
            source = (_windowed(level, window, read_ahead) if resolution.resampled else
                      PixelSource.from_slide(slide, resolution.level, window, read_ahead))
            source.tissue = tissue
        except BaseException:
            slide.close()
            raise
        return SlideRead(source, slide, resolution, window)


def _size_text(size: tuple[int, int] | None) -> str:
    return "whole images" if size is None else f"{size[1]} x {size[0]} crops"


def _windowed(level: ResampledLevel, window: Box, read_ahead: int) -> PixelSource:
    """The window (y0, y1, x0, x1) of the resampled level, in its pixels (it may extend past
    it: the outside reads as white), as a lazy PixelSource. (A level read as it is goes
    through `PixelSource.from_slide`, which can also decode on a GPU.)"""
    wy0, wy1, wx0, wx1 = window

    def read_rgb(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return level.read(wy0 + y0, wy0 + y1, wx0 + x0, wx0 + x1)

    def level0(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return level.level0(wy0 + y, wx0 + x)

    return PixelSource(read_rgb, wy1 - wy0, wx1 - wx0, level0=level0, read_ahead=read_ahead)


@dataclass
class SlideRead:
    """An opened read: the lazy `source` (pixels / 255, with the slide's tissue), the
    `slide` it reads, the `resolution` resolved (level, scale, mpp) and the `window`
    (y0, y1, x0, x1) in the resolved image's pixels. `close()` closes both."""

    source: PixelSource
    slide: SlideImage
    resolution: Resolution
    window: Box

    def close(self) -> None:
        self.source.close()
        self.slide.close()

    def __enter__(self) -> SlideRead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class ModelInput:
    """What predict hands a model for one slide: `pixels` (1, 3, H, W), pixels / 255 as
    read; `mask` (H', W') bool at the stream's output resolution, or None (every output
    counts); `resolution` as read."""

    pixels: torch.Tensor
    mask: torch.Tensor | None
    resolution: Resolution


def model_input(model: Classifier, image: str | Path | Sample,
                spec: ReadSpec | None = None) -> ModelInput:
    """The whole input predict would give `model` for `image`, read with `spec` (default:
    the model's own, `ReadSpec.for_model`), in memory: `model(x.pixels, mask=x.mask)` then
    gives predict's outputs. For images that fit in memory; predict itself streams."""
    spec = spec or ReadSpec.for_model(model.config)
    with spec.open(image, read_ahead=0) as read:
        scnn = StreamingCNN(model.stream, max(read.source.height, read.source.width))
        mask = output_mask(read.source, scnn)
        return ModelInput(read.source.to_tensor(), mask, read.resolution)
