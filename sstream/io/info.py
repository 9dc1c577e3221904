"""What a slide file holds, in one record a person (or a script) reads: what
`openslide-show-properties` and `tiffinfo` give, for any backend (`sstream info`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sstream.io.atomic import atomic_output
from sstream.io.reader import SlideImage, open_image, read_downsampled
from sstream.io.resample import resolve_read

# where backends keep the scanner's objective magnification
_OBJECTIVE_KEYS = ("openslide.objective-power", "aperio.AppMag")


@dataclass
class LevelInfo:
    width: int
    height: int
    downsample: float
    mpp: float | None


@dataclass
class SlideInfo:
    """A slide's format, backend, pyramid, resolution and associated images.

    `chosen_level` is the level `--mpp` would read (None when it was not asked), `resize`
    the factor that level is resized by to be read at exactly that mpp (1: as it is), and
    `read_size` the (width, height) of the image read.
    """

    path: str
    format: str | None
    backend: str
    levels: list[LevelInfo]
    mpp: float | None
    objective_power: float | None
    associated: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (w, h)
    chosen_level: int | None = None
    file_bytes: int = 0
    resize: float | None = None
    read_size: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def slide_info(path: str | os.PathLike, mpp: float | None = None, backend: str | None = None,
               assume_mpp: float | None = None) -> SlideInfo:
    """Open the slide and describe it; with `mpp`, also how that mpp reads it (the level,
    the resize factor, the size: `sstream.io.resample.resolve_read`, with `assume_mpp` for
    a slide that states no resolution).

    Raises:
        ImageReadError: the file cannot be read, or states no resolution when `mpp` is given
            without `assume_mpp`. ValueError: a non-positive mpp.
    """
    with open_image(path, backend) as slide:
        read = None if mpp is None else resolve_read(slide, mpp=mpp, assume_mpp=assume_mpp)
        return SlideInfo(
            path=str(slide.path), format=slide.vendor, backend=slide.backend,
            levels=[LevelInfo(w, h, round(slide.level_downsamples[i], 4), slide.level_mpp(i))
                    for i, (w, h) in enumerate(slide.level_dimensions)],
            mpp=slide.mpp, objective_power=_objective_power(slide),
            associated={name: _size(slide.associated_image(name))
                        for name in slide.associated},
            chosen_level=None if read is None else read.level,
            file_bytes=_file_bytes(Path(slide.path)),
            resize=None if read is None else read.resize,
            read_size=None if read is None else read.size)


def write_thumbnail(path: str | os.PathLike, out: str | os.PathLike, max_side: int = 1024,
                    overwrite: bool = False, backend: str | None = None) -> tuple[int, int]:
    """A PNG of the whole slide, `max_side` px on its longer side (never upsampled), read
    from the coarsest level that is still fine enough; its (width, height)."""
    with open_image(path, backend) as slide:
        width, height = slide.dimensions
        scale = min(1.0, max_side / max(width, height))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        rgb = read_downsampled(slide, 0, shape)
    with atomic_output(out, overwrite=overwrite) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return shape[1], shape[0]


def _objective_power(slide: SlideImage) -> float | None:
    for key in _OBJECTIVE_KEYS:
        try:
            return float(slide.properties[key])
        except (KeyError, ValueError):
            continue
    description = slide.properties.get("ImageDescription", "")
    for part in description.split("|"):  # Aperio's description, read by tifffile
        name, _, value = part.partition("=")
        if name.strip() == "AppMag":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _size(image: np.ndarray) -> tuple[int, int]:
    return int(image.shape[1]), int(image.shape[0])


def _file_bytes(path: Path) -> int:
    """The file's size, or a DICOM series' or MIRAX folder's whole size."""
    folder = path.with_suffix("") if path.suffix.lower() == ".mrxs" else None
    total = path.stat().st_size
    if path.suffix.lower() == ".dcm":
        total = sum(p.stat().st_size for p in path.parent.glob("*.dcm"))
    if folder is not None and folder.is_dir():
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return total
