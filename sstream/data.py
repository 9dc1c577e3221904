"""Image-level datasets: label CSVs, and slides presented to the engine as image sources.

This is where `sstream.io` (pixels, files) meets the engine (tensors): a `PixelSource` is an
`sstream.engine.ImageSource` whose `read(box)` returns a float tensor (1, 3, h, w) of
pixels / 255 — exactly what `load_checkpoint`'s module takes — computed from uint8 RGB on
demand, region by region. So a gigapixel slide is never one float tensor: either it stays on
disk (`PixelSource.from_slide`, read lazily) or it is held as uint8 (`from_array`, 3 bytes a
pixel) and converted crop by crop.

Augmentation (`Augmentation`) suits slides, which have no canonical orientation: flips,
90-degree rotations and a light per-pixel colour jitter (brightness and per-channel gain).
All of it is per pixel or a permutation of pixels, so it commutes with region reads.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstream.errors import InputError, first_line
from sstream.gpu_decode import JpegRegionReader, jpeg_decoder
from sstream.io import SlideImage, positive_number
from sstream.io.prefetch import DEFAULT_READ_AHEAD, ReadAhead
from sstream.io.tissue import TissueMask
from sstream.task import Classification, Task

Box = tuple[int, int, int, int]
RegionReader = Callable[[int, int, int, int], np.ndarray]
"""(y0, y1, x0, x1) -> uint8 RGB array (y1 - y0, x1 - x0, 3); regions may cross the border."""
DeviceRegionReader = Callable[[int, int, int, int], torch.Tensor]
"""A RegionReader that hands out a uint8 (h, w, 3) tensor on a device (nvJPEG)."""
PointMap = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(y, x) image coordinates (float arrays that broadcast; pixel (i, j) spans [i, i + 1) x
[j, j + 1)) -> the same points as (y, x) in level-0 pixels of the slide they were read from."""


def _identity(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return y, x


class DatasetError(InputError):
    """A label CSV or its images are unusable; the message lists every problem found."""


@dataclass(frozen=True)
class Sample:
    """One CSV row: an image path (resolved against the CSV's folder), its label (as the
    task reads it), its tissue mask file (an optional `mask` column; None where empty or
    absent), its patient (an optional `patient` column: the slides of one patient stay
    on one side of every split; None where empty or absent) and its level 0's µm per pixel
    for a slide that states none (an optional `mpp` column)."""

    image: Path
    label: int | tuple[float, ...] | None  # a class, or regression targets
    row: int  # 1-based line number in the CSV (the header is line 1)
    mask: Path | None = None
    patient: str | None = None
    mpp: float | None = None


def read_csv_rows(path: Path) -> list[list[str]]:
    """A CSV's rows as written, blank rows left out (a UTF-8 byte order mark ignored); a
    file that is not UTF-8 text or not CSV is a DatasetError naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a UTF-8 CSV file ({first_line(exc)})") from None
    return [r for r in rows if any(cell.strip() for cell in r)]


def read_label_csv(path: str | Path, task: Task | None = None,
                   require_labels: bool = True) -> list[Sample]:
    """Read a CSV with header `image,label` (paths relative to the CSV's folder; the label
    columns are the task's: `label`, or `label_<name>` per regression target), an
    optional `mask` column: a tissue mask image per slide (see `sstream.io.tissue`), and an
    optional `patient` column (`Sample.patient`), and an optional `mpp` column (level 0's
    µm per pixel, for slides that do not state it).

    Every problem is collected and raised at once as DatasetError, with line numbers: missing
    or empty file, wrong header, a label the task cannot read (not an integer, out of range,
    not a finite number), duplicate rows, image or mask paths that do not exist. `task`
    defaults to classification with any number of classes.
    """
    task = Classification() if task is None else task
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: CSV file not found" if not path.exists()
                           else f"{path}: is not a file")
    rows = read_csv_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the CSV is empty (expected header 'image,label')")
    header = [cell.strip().lower() for cell in rows[0]]
    if "image" not in header or (require_labels and header[0] != "image"):
        raise DatasetError(f"{path}: header is {','.join(rows[0])!r}, expected 'image,label'")
    label_cols = None
    if require_labels or any(c == "label" or c.startswith("label_") for c in header):
        try:
            label_cols = task.label_columns(header)
            task.scan([row[label_cols[0]].strip() for row in rows[1:]
                       if label_cols[0] < len(row)])  # class names, before any row is parsed
        except ValueError as exc:
            raise DatasetError(f"{path}: header is {','.join(rows[0])!r}: {exc}") from None
    image_col = header.index("image")
    mask_col = header.index("mask") if "mask" in header else None
    patient_col = header.index("patient") if "patient" in header else None
    mpp_col = header.index("mpp") if "mpp" in header else None
    samples, problems, seen = [], [], {}
    for line, row in enumerate(rows[1:], start=2):
        image_text = row[image_col].strip() if image_col < len(row) else ""
        if not image_text:
            problems.append(f"line {line}: empty image path")
            continue
        image = (path.parent / image_text).resolve()
        texts = [row[c].strip() if c < len(row) else "" for c in label_cols or []]
        label = None
        if label_cols is not None and (require_labels or any(texts)):
            try:
                label = task.parse_label(texts)
            except ValueError as exc:
                problems.append(f"line {line}: {exc}")
                continue
        if image in seen:
            problems.append(f"line {line}: duplicate of line {seen[image]} ({image_text})")
            continue
        seen[image] = line
        if not image.exists():  # a file, or a DICOM series' folder
            problems.append(f"line {line}: image not found: {image}")
            continue
        mask_text = row[mask_col].strip() if mask_col is not None and mask_col < len(row) \
            else ""
        mask = (path.parent / mask_text).resolve() if mask_text else None
        if mask is not None and not mask.is_file():
            problems.append(f"line {line}: mask not found: {mask}")
            continue
        patient = row[patient_col].strip() if patient_col is not None and \
            patient_col < len(row) else ""
        mpp_text = row[mpp_col].strip() if mpp_col is not None and mpp_col < len(row) else ""
        mpp = positive_number(mpp_text)
        if mpp_text and mpp is None:
            problems.append(f"line {line}: mpp {mpp_text!r} is not a positive number")
            continue
        samples.append(Sample(image, label, line, mask, patient or None, mpp))
    if not samples and not problems:
        problems.append("no data rows after the header")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)"
                                           if len(problems) > 8 else "")
        raise DatasetError(f"{path}: {shown}")
    return samples


def named_samples(images: Sequence[str], csv_path: str | None, task: Task
                  ) -> list[tuple[str, Sample]]:
    """The slides a job reads, each with the name the user knows it by: image paths as
    given, or the rows of a CSV (`read_label_csv`, labels optional) named as written there,
    relative to the CSV's folder.

    Raises:
        ValueError: both images and a CSV, or neither.
        DatasetError: a bad CSV (see `read_label_csv`).
    """
    if csv_path and images:
        raise InputError("give images or --csv, not both")
    if csv_path:
        samples = read_label_csv(csv_path, task, require_labels=False)
        root = Path(csv_path).parent.resolve()
        return [(str(s.image.relative_to(root) if s.image.is_relative_to(root) else s.image),
                 s) for s in samples]
    if not images:
        raise InputError("no images given: pass image paths or --csv list.csv")
    return [(str(name), Sample(Path(name), None, 0)) for name in images]




@dataclass(frozen=True)
class Augmentation:
    """A slide-friendly random transform, fixed per image: a dihedral symmetry (flips and
    90-degree rotations, `rotations` quarter turns counter-clockwise after an optional
    horizontal flip) and a per-pixel colour jitter `pixel * brightness * gain[channel]`."""

    flip: bool = False
    rotations: int = 0
    brightness: float = 1.0
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def draw(cls, generator: np.random.Generator, colour_jitter: float = 0.05) -> Augmentation:
        return cls(
            flip=bool(generator.integers(2)), rotations=int(generator.integers(4)),
            brightness=float(1 + generator.uniform(-colour_jitter, colour_jitter)),
            gains=tuple(float(1 + generator.uniform(-colour_jitter / 2, colour_jitter / 2))
                        for _ in range(3)))  # type: ignore[arg-type]

    @property
    def is_identity(self) -> bool:
        return self == Augmentation()

    def apply(self, rgb: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Apply the geometric part to a whole (h, w, 3) array (a view where possible) or
        tensor (regions decoded on a GPU)."""
        if isinstance(rgb, torch.Tensor):
            if self.flip:
                rgb = torch.flip(rgb, dims=(1,))
            return torch.rot90(rgb, self.rotations, dims=(0, 1)) if self.rotations else rgb
        if self.flip:
            rgb = rgb[:, ::-1]
        return np.rot90(rgb, self.rotations) if self.rotations else rgb

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of `height` x `width` after the transform."""
        return (width, height) if self.rotations % 2 else (height, width)

    def source_box(self, box: Box, height: int, width: int) -> Box:
        """The box (y0, y1, x0, x1) of the untransformed `height` x `width` image whose
        transform (`apply`) is the transformed image's `box`: a dihedral transform maps
        rectangles to rectangles, so its corners suffice."""
        y0, y1, x0, x1 = box
        corners = [self._source_point(y, x, height, width)
                   for y in (y0, y1 - 1) for x in (x0, x1 - 1)]
        ys, xs = [c[0] for c in corners], [c[1] for c in corners]
        return min(ys), max(ys) + 1, min(xs), max(xs) + 1

    def _source_point(self, y: Any, x: Any, height: int, width: int, pixel: int = 1
                      ) -> tuple[Any, Any]:
        """The untransformed point that lands at (y, x): np.rot90 undone turn by turn (a
        quarter turn counter-clockwise puts a (h, w) array's [j, w - 1 - i] at [i, j]), then
        the flip. Pixel indices with `pixel` 1; continuous coordinates (a pixel (i, j)
        spans [i, i + 1)) with `pixel` 0. Numbers or arrays that broadcast."""
        for turn in range(self.rotations, 0, -1):
            before_width = width if (turn - 1) % 2 == 0 else height
            y, x = x, before_width - pixel - y
        return (y, width - pixel - x) if self.flip else (y, x)

    def point_map(self, inner: PointMap, height: int, width: int) -> PointMap:
        """`inner` (the untransformed `height` x `width` image's PointMap) for the
        transformed image's points."""
        if not self.flip and not self.rotations:
            return inner

        def points(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return inner(*self._source_point(y, x, height, width, pixel=0))

        return points

    def region_reader(self, read_rgb: RegionReader, height: int, width: int
                      ) -> RegionReader:
        """A RegionReader of the transformed image, reading only the matching region of the
        `height` x `width` image that `read_rgb` reads (regions inside the image)."""
        if not self.flip and not self.rotations:
            return read_rgb

        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            sy0, sy1, sx0, sx1 = self.source_box((y0, y1, x0, x1), height, width)
            return self.apply(read_rgb(sy0, sy1, sx0, sx1))

        return read

    def colour(self) -> torch.Tensor | None:
        """Per-channel multipliers (1, 3, 1, 1), or None for no colour change."""
        factors = [self.brightness * g for g in self.gains]
        if all(f == 1.0 for f in factors):
            return None
        return torch.tensor(factors, dtype=torch.float32).view(1, 3, 1, 1)


class PixelSource:
    """An ImageSource (1, 3, H, W) of float pixels / 255, read region by region from uint8.

    Use `from_array` for an image held in memory as uint8 RGB, `from_slide` for a lazily
    read slide level. `colour` optionally multiplies each channel (colour jitter); values are
    clipped to [0, 1] afterwards, as they would be for a real image.
    """

    def __init__(self, read_rgb: RegionReader, height: int, width: int,
                 colour: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 slide: SlideImage | None = None, level0: PointMap = _identity,
                 read_ahead: int = 0) -> None:
        if height <= 0 or width <= 0:
            raise InputError(f"image has no pixels ({width} x {height})")
        self._read_rgb, self.height, self.width = read_rgb, int(height), int(width)
        self.colour, self.dtype = colour, dtype
        self._slide = slide  # closed by `close()`: the source owns it
        self.level0 = level0  # where this image's points lie on the slide
        self.tissue: TissueMask | None = None  # the slide's tissue, when the job wants it
        # a per-pixel colour function of (1, 3, h, w) pixels fixed per image (stain
        # normalisation, stain augmentation: `sstream.stain`), applied after `colour`
        self.stain: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.read_ahead = read_ahead  # regions decoded ahead once the engine announces them
        self._ahead: ReadAhead[Box, np.ndarray] | None = None
        self.device = torch.device("cpu")  # where `read` hands its tensors
        # a RegionReader that decodes on a device (nvJPEG), made per device where possible
        self._device_reader: Callable[[torch.device], DeviceRegionReader | None] | None = None
        self._device_read: DeviceRegionReader | None = None

    def to(self, device: torch.device | str) -> PixelSource:
        """Hand regions out on `device`: the uint8 pixels are copied there (pinned, without
        blocking, from CUDA's point of view) and become floats on it, four times fewer bytes
        over the bus than floats would be. The values are the same on every device. With
        `sstream --jpeg-decoder nvjpeg`, a slide level of JPEG tiles read onto a GPU is
        decoded there (`sstream.gpu_decode`; not under flips and rotations)."""
        self.device = torch.device(device)
        self._device_read = None
        if self.device.type == "cuda" and self._device_reader is not None:
            self._device_read = self._device_reader(self.device)
        return self

    def prefer_device(self, device: torch.device) -> None:
        """The engine's hint of the device it computes on (see `to`)."""
        if device != self.device:
            self.to(device)

    def expect(self, boxes: Sequence[Box]) -> None:
        """The engine's announcement of the regions it reads next, in order: with
        `read_ahead` > 0, that many of them are decoded ahead on background threads
        (`sstream.io.prefetch`); without, nothing happens."""
        if self.read_ahead <= 0:
            return
        if self._ahead is None:
            self._ahead = ReadAhead(self._read_pixels, self.read_ahead)
        self._ahead.expect(boxes)

    def _read_pixels(self, box: Box) -> np.ndarray | torch.Tensor:
        """uint8 (h, w, 3): a numpy array, or a tensor on the device where it decodes."""
        read = self._device_read or self._read_rgb
        return read(*box)

    def close(self) -> None:
        """Stop reading ahead, then close the slide this source reads from, if it owns one
        (`open_lazily`)."""
        if self._ahead is not None:
            self._ahead.close()
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.height, self.width)

    def read(self, box: Box) -> torch.Tensor:
        rgb = self._ahead(box) if self._ahead is not None else self._read_pixels(box)
        if isinstance(rgb, torch.Tensor):  # decoded on the device
            pixels = rgb
        else:
            rgb = np.ascontiguousarray(rgb)
            if not rgb.flags.writeable:  # torch wants writable memory; a file's views may not
                rgb = rgb.copy()
            pixels = torch.from_numpy(rgb)  # (h, w, 3) uint8
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        elif self.device != pixels.device:
            pixels = pixels.to(self.device)
        pixels = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w) uint8
        if pixels.device.type == "cpu":
            pixels = pixels.to(self.dtype) / 255.0
        else:  # CUDA divides by a scalar as a product with its reciprocal: not always
            pixels = _pixel_values(self.dtype, pixels.device)[pixels.long()]  # v / 255
        if self.colour is not None:
            pixels = (pixels * self.colour.to(self.device, self.dtype)).clamp_(0.0, 1.0)
        if self.stain is not None:
            pixels = self.stain(pixels)
        return pixels

    def to_rgb_array(self) -> np.ndarray:
        """The whole image as uint8 (H, W, 3), before any colour change."""
        return np.ascontiguousarray(self._read_rgb(0, self.height, 0, self.width))

    def to_tensor(self) -> torch.Tensor:
        """The whole image as one tensor (1, 3, H, W): for small images and references."""
        return self.read((0, self.height, 0, self.width))

    @classmethod
    def from_array(cls, rgb: np.ndarray, augmentation: Augmentation | None = None,
                   fill: int = 255, dtype: torch.dtype = torch.float32,
                   level0: PointMap = _identity) -> PixelSource:
        """An in-memory uint8 (H, W, 3) image; regions crossing the border read as `fill`.
        `level0` places the (untransformed) array's points on a slide."""
        augmentation = augmentation or Augmentation()
        level0 = augmentation.point_map(level0, *rgb.shape[:2])
        rgb = augmentation.apply(rgb)
        height, width = rgb.shape[:2]

        def read_rgb(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            if 0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width:
                return rgb[y0:y1, x0:x1]
            out = np.full((y1 - y0, x1 - x0, 3), fill, dtype=np.uint8)
            iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
            if iy0 < iy1 and ix0 < ix1:
                out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = rgb[iy0:iy1, ix0:ix1]
            return out

        return cls(read_rgb, height, width, colour=augmentation.colour(), dtype=dtype,
                   level0=level0)

    @classmethod
    def from_slide(cls, slide: SlideImage, level: int = 0, window: Box | None = None,
                   read_ahead: int = DEFAULT_READ_AHEAD) -> PixelSource:
        """A slide level read lazily; `window` (y0, y1, x0, x1) in level pixels selects a
        part of it (it may extend past the level: the outside reads as white). `read_ahead`
        regions are decoded ahead of the engine (0: none)."""
        level_width, level_height = slide.level_dimensions[level]
        wy0, wy1, wx0, wx1 = window or (0, level_height, 0, level_width)
        scale_x = slide.dimensions[0] / level_width
        scale_y = slide.dimensions[1] / level_height

        def read_rgb(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            # level pixels -> level-0 location; read_region floors it back to the same pixel
            location = (math.ceil((wx0 + x0) * scale_x), math.ceil((wy0 + y0) * scale_y))
            return slide.read_region(location, level, (x1 - x0, y1 - y0))

        def level0(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (wy0 + y) * scale_y, (wx0 + x) * scale_x

        source = cls(read_rgb, wy1 - wy0, wx1 - wx0, level0=level0, read_ahead=read_ahead)

        def device_reader(device: torch.device) -> DeviceRegionReader | None:
            if jpeg_decoder() == "cpu" or not JpegRegionReader.supports(slide, level):
                return None
            decode = JpegRegionReader(slide, level, device)
            return lambda y0, y1, x0, x1: decode(wy0 + y0, wy0 + y1, wx0 + x0, wx0 + x1)

        source._device_reader = device_reader
        return source

    def augmented(self, augmentation: Augmentation | None, dtype: torch.dtype,
                  slide: SlideImage | None = None) -> PixelSource:
        """This image under `augmentation`, still read region by region: the geometric part
        maps each region to the one to read. `slide` (the slide this source reads) passes to
        the new source, which then closes it in `close()`."""
        augmentation = augmentation or Augmentation()
        height, width = augmentation.shape(self.height, self.width)
        reader = augmentation.region_reader(self._read_rgb, self.height, self.width)
        source = PixelSource(reader, height, width, colour=augmentation.colour(),
                             dtype=dtype, slide=slide, read_ahead=self.read_ahead,
                             level0=augmentation.point_map(self.level0, self.height,
                                                           self.width))
        inner = self._device_reader
        if inner is not None:
            def device_reader(device: torch.device) -> DeviceRegionReader | None:
                read = inner(device)
                return None if read is None else augmentation.region_reader(
                    read, self.height, self.width)

            source._device_reader = device_reader
        return source.to(self.device)


@functools.cache
def _pixel_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 256 values v / 255 as the CPU divides (correctly rounded), on `device`."""
    return (torch.arange(256, dtype=dtype) / 255.0).to(device)


def fit_window(height: int, width: int, size: tuple[int, int] | None, mode: str,
               generator: np.random.Generator | None = None,
               around: tuple[float, float] | None = None) -> Box:
    """The (y0, y1, x0, x1) window of an image cropped or padded to `size` (h, w).

    mode "center" centres the window; "random" draws its offset (training), or centres it
    on `around` (y, x) where given (a random tissue point: crops of slides then hold tissue),
    kept inside the image. Padding (a window larger than the image) is centred in either
    mode; outside pixels read as white.
    """
    if size is None:
        return (0, height, 0, width)
    starts = []
    for axis, (extent, want) in enumerate(((height, size[0]), (width, size[1]))):
        if want >= extent or mode == "center" or generator is None:
            starts.append((extent - want) // 2)
        elif around is not None:
            starts.append(min(max(0, round(around[axis] - want / 2)), extent - want))
        else:
            starts.append(int(generator.integers(0, extent - want + 1)))
    return (starts[0], starts[0] + size[0], starts[1], starts[1] + size[1])

