"""`sstream info`: what slides hold, as a job with a configuration.

The record itself (format, backend, levels, resolution, objective, associated images) is
`sstream.io.info.slide_info`; this module holds the job's options, checked before a slide is
opened, and the thumbnail the job writes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sstream.io.info
from sstream.errors import InputError, SstreamError, first_line
from sstream.io.info import SlideInfo
from sstream.options import ASSUME_MPP_HELP, Options, option

__all__ = ["InfoConfig", "SlideRecords", "Thumbnail", "describe_slide", "describe_slides",
           "write_slide_thumbnail"]


@dataclass
class InfoConfig(Options):
    """The options of `sstream info` (`describe_slide`, `write_slide_thumbnail`)."""

    mpp: float | None = option(None, "Also say how --mpp would read each slide: the level, its "
                               "resize factor, the size read.")
    assume_mpp: float | None = option(None, ASSUME_MPP_HELP)
    thumbnail: str | None = option(None, "Write a PNG thumbnail (one slide).")
    max_side: int = option(1024, "Longer side of the thumbnail.")
    overwrite: bool = option(False, "Replace the thumbnail.")

    def validate(self) -> None:
        """InputError for options that cannot work (before any slide is opened)."""
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise InputError(f"--mpp must be a positive number, got {self.mpp}")
        if self.max_side < 16:
            raise InputError("--max-side must be at least 16")
        from sstream.reading import ReadSpec  # loads torch: only when asked

        ReadSpec(mpp=self.mpp, assume_mpp=self.assume_mpp)


@dataclass
class Thumbnail:
    """What `write_slide_thumbnail` wrote: the PNG and its size in pixels."""

    path: Path
    width: int
    height: int


def describe_slide(slide: str | os.PathLike, config: InfoConfig | None = None,
                   **options: Any) -> SlideInfo:
    """The slide's record (`sstream.io.info.SlideInfo`), with how `mpp` would read it where
    given. Options come as an `InfoConfig`, by name (`describe_slide(path, mpp=0.5)`), or
    both.

    Raises:
        InputError: options that cannot work. ImageReadError: the slide cannot be read, or
            states no resolution when `mpp` is given without `assume_mpp`.
    """
    config = InfoConfig.given(config, options)
    config.validate()
    return sstream.io.info.slide_info(slide, config.mpp, assume_mpp=config.assume_mpp)


@dataclass
class SlideRecords:
    """What `describe_slides` found: a record per readable slide, and (slide, one line
    naming it and what is wrong) per slide that could not be described."""

    records: list[SlideInfo]
    failures: list[tuple[Path, str]]


def describe_slides(slides: list[str | os.PathLike], config: InfoConfig | None = None,
                    **options: Any) -> SlideRecords:
    """`describe_slide` of each slide: one unreadable slide among several does not hide the
    others. Options that cannot work raise InputError before any slide is opened."""
    config = InfoConfig.given(config, options)
    config.validate()
    found = SlideRecords([], [])
    for slide in slides:
        try:
            found.records.append(describe_slide(slide, config))
        except (SstreamError, OSError) as exc:
            reason = first_line(exc)
            found.failures.append((Path(slide), reason if str(slide) in reason
                                   else f"{slide}: {reason}"))
    return found


def write_slide_thumbnail(slide: str | os.PathLike, config: InfoConfig) -> Thumbnail:
    """The slide as a PNG at `config.thumbnail`, `max_side` px on its longer side (never
    upsampled), written atomically.

    Raises:
        InputError: no `thumbnail` path. FileExistsError: it exists and `overwrite` is off.
    """
    config.validate()
    if config.thumbnail is None:
        raise InputError("give a thumbnail path to write the thumbnail to")
    width, height = sstream.io.info.write_thumbnail(slide, config.thumbnail, config.max_side,
                                                    config.overwrite)
    return Thumbnail(Path(config.thumbnail), width, height)
