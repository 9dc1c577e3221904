"""Lazy reading of gigapixel slides with the OpenSlide vocabulary.

`open_image(path)` returns a `SlideImage`. Coordinates follow OpenSlide: `location` is (x, y)
in level-0 pixels, `size` is (w, h) in pixels of the requested level, and arrays come back as
(h, w, 3) uint8 RGB. TIFF files (tiled or striped, classic or BigTIFF, pyramids as tifffile
series levels: SubIFDs, top-level reduced pages, Aperio SVS, OME) are read through a
tifffile zarr store per level, so a region read decodes only the tiles or strips it
intersects. PNG/JPEG/other Pillow formats are small by nature and are decoded whole.

Conversion to RGB uint8 (`to_rgb8`), applied to every pixel the same way:

- bit depth: uint8 as is; other unsigned integers keep their top 8 bits (`v >> (bits - 8)`,
  so uint16 is `v >> 8`); signed integers are clipped at 0 and scaled `v * 255 // max`;
  bool is 0 / 255; float is `rint(clip(v * s, 0, 255))` with NaN -> 0, where `s` is decided
  once per image: `s = 255` (values are in [0, 1]) unless the image's smallest pyramid level
  (read at open if it has at most 4 MP) has a maximum above 1, then `s = 1` (values already
  in [0, 255]).
- channels: 1 (gray) is repeated to RGB; 3 is RGB; 2 (gray + alpha) and 4 (RGBA) are
  composited over white, `(c * a + 255 * (255 - a) + 127) // 255` on 8-bit values; more
  than 4 channels: the first 3 are taken as RGB. Palette images go through their colormap
  (top 8 bits); MinIsWhite grayscale is inverted.
- other axes (a Z, T or page sequence of equal-size planes): the first plane is read.
- sparse TIFF tiles (offset or byte count 0, legal in TIFF) read as 0 before conversion.

Errors are one line `ImageReadError("<path>: <cause>")`, raised at open (missing file,
directory, not an image, truncated/corrupt structure, unsupported compression, zero size)
or at read time (a tile that fails to decode); never garbage pixels.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sstream.errors import InputError
from sstream.io.parallel import TiffTiles, default_read_workers, run_parallel

__all__ = [
    "BACKENDS",
    "ImageReadError",
    "PIL_MAX_PIXELS",
    "SlideImage",
    "open_image",
    "positive_number",
    "to_rgb8",
]

# Pillow refuses images above ~179 MP as decompression bombs. Slides routinely exceed that,
# so the limit is raised on purpose (per open, under a lock, restored afterwards) to this
# value: 1 GP decodes to 3 GB of RGB. Larger images belong in a tiled TIFF.
PIL_MAX_PIXELS = 1_000_000_000

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
BACKENDS = ("auto", "tifffile", "openslide")
# formats only OpenSlide reads (without it installed, a file named so gets the extra's name)
_OPENSLIDE_SUFFIXES = {".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm", ".ndpi"}
# TIFF-based formats tifffile opens but does not lay out as OpenSlide does (Leica SCN's
# several images, Ventana BIF's overlapping tiles): auto takes OpenSlide for them
_OPENSLIDE_VENDORS = {"leica", "ventana"}
_OPENSLIDE_TIFF_SUFFIXES = {".scn", ".bif"}
_OPENSLIDE_EXTRA = "pip install 'sstream[openslide]'"
_FLOAT_PROBE_MAX_PIXELS = 4_000_000
_LEVEL_TOLERANCE = 0.01  # relative slack when comparing downsamples and mpp
_PIL_LOCK = threading.Lock()

# tifffile logs what it finds wrong with a file at ERROR level and carries on; sstream reports
# those problems itself as one ImageReadError, so the log lines would only be noise on stderr.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


class ImageReadError(InputError):
    """An image cannot be opened or a region cannot be decoded; the message names the file."""

    def __init__(self, path: str | os.PathLike, cause: str | BaseException):
        if isinstance(cause, BaseException):
            cause = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        cause = " ".join(str(cause).split())  # always one line
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = str(path), cause

    def __reduce__(self) -> tuple:
        """Pickled as (path, cause), so an error crosses a process boundary whole."""
        return (type(self), (self.path, self.cause))


def open_image(path: str | os.PathLike, backend: str | None = None,
               read_workers: int | None = None) -> SlideImage:
    """Open a slide or ordinary image lazily; see `SlideImage`.

    `backend`: "auto" (the default, or the SSTREAM_BACKEND environment variable that
    `sstream --backend` sets), "tifffile" or "openslide"; see `SlideImage`.
    `read_workers`: threads that decode a region's tiles (None: `default_read_workers()`).

    Raises:
        ImageReadError: missing file, a directory, not a readable image, corrupt or truncated
            structure, unsupported compression or a zero-sized image, a format whose backend
            is not installed (the message names the extra).
    """
    return SlideImage(path, backend, read_workers)


class SlideImage:
    """A multi-resolution image read lazily, region by region (OpenSlide vocabulary).

    Attributes:
        path: the file.
        dimensions: (width, height) of level 0.
        level_count: number of pyramid levels (1 for a flat image).
        level_dimensions: (width, height) per level, largest first.
        level_downsamples: level-0 size / level size per level (mean of x and y ratios).
        mpp: microns per pixel of level 0 (mean of x and y), None if the file does not say.
            Sources in order: Aperio description `MPP = `, OME `PhysicalSizeX/Y`, TIFF
            XResolution/YResolution with ResolutionUnit inch or centimetre. PNG/JPEG: None.
        mpp_x, mpp_y: the same per axis.

        backend: "tifffile", "openslide" or "pillow": what reads the file.
        vendor: the format OpenSlide names ("aperio", "mirax", "dicom", ...), or for tifffile
            the TIFF flavour ("svs", "ome", "ndpi", ... or "generic-tiff"); None for Pillow.
        properties: the backend's metadata as strings (OpenSlide's properties; tifffile: the
            first page's tags); associated: names of the associated images (label, macro,
            thumbnail) that `associated_image(name)` reads.

    Backends: "auto" picks tifffile for TIFF files (fast and lazy; but OpenSlide, where
    installed, for Leica SCN and Ventana BIF files named .scn or .bif, whose layouts it
    knows: an ordinary TIFF is not probed), Pillow for PNG, JPEG
    and the like, and OpenSlide for the rest (MIRAX, Hamamatsu VMS, Sakura SVSlide, DICOM:
    a file of the series, or its folder). Where they differ: OpenSlide hands out RGBA, with
    the areas no scan covers transparent; sstream composites it over the slide's declared
    background colour (`openslide.background-color`, else white), as it composites any alpha
    over white, so both backends give the same RGB where both read a file, with two
    exceptions: at a level whose downsample is not an integer (a 103 px level of a 410 px
    image) OpenSlide keeps the level-0 location fractional and paints the region at a
    sub-pixel offset (interpolated pixels, up to a pixel's difference), and its JPEG decoder
    differs from imagecodecs' in the last bits. OpenSlide reads no SubIFDs, strips or JPEG
    2000 in generic TIFFs: auto never sends it those.

    Reads are thread-safe, and a region's tiles decode in parallel on `read_workers`
    threads (`sstream.io.parallel`): tiled and striped TIFF pages through positioned reads
    of the file and tifffile's decoder, OpenSlide through a handle per thread. Other layouts
    (several planes per level, NDPI) are read one region at a time under a lock. `close()`
    waits for reads in flight. Use as a context manager or call `close()`.
    """

    def __init__(self, path: str | os.PathLike, backend: str | None = None,
                 read_workers: int | None = None):
        self.path = Path(path)
        self.read_workers = read_workers or default_read_workers()
        self._lock = threading.RLock()
        self._idle = threading.Condition(threading.Lock())  # no read in flight
        self._reads_in_flight = 0
        self._fd: int | None = None
        self._handle = None
        self._closed = False
        self._levels: list[_Level] = []
        self.mpp_x: float | None = None
        self.mpp_y: float | None = None
        self.vendor: str | None = None
        self.properties: dict[str, str] = {}
        self._associated: dict[str, object] = {}
        backend = backend or os.environ.get("SSTREAM_BACKEND") or "auto"
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if not self.path.exists():
            raise ImageReadError(self.path, "no such file")
        if self.path.is_dir():
            dicom = sorted(self.path.glob("*.dcm"))
            if not dicom:
                raise ImageReadError(self.path, "is a directory, not an image file (nor a "
                                                "DICOM series: no .dcm files)")
            self.path = dicom[0]  # OpenSlide opens a DICOM series from any of its files
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ImageReadError(self.path, e) from e
        if len(magic) == 0:
            raise ImageReadError(self.path, "empty file (0 bytes)")
        try:
            self.backend = _choose_backend(self.path, magic, backend)
            {"tifffile": self._open_tiff, "pillow": self._open_pillow,
             "openslide": self._open_openslide}[self.backend]()
        except ImageReadError:
            self.close()
            raise
        except ZeroDivisionError as e:  # tifffile's reaction to a 0 width/height/tile size
            self.close()
            raise ImageReadError(self.path, "zero-sized image or tile in the TIFF header") from e
        except Exception as e:  # anything tifffile/Pillow raise on a bad file
            self.close()
            raise ImageReadError(self.path, e) from e
        w0, h0 = self._levels[0].width, self._levels[0].height
        self.dimensions: tuple[int, int] = (w0, h0)
        self.level_count: int = len(self._levels)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (lv.width, lv.height) for lv in self._levels
        )
        self.level_downsamples: tuple[float, ...] = tuple(
            (w0 / lv.width + h0 / lv.height) / 2 for lv in self._levels
        )

    # ---- OpenSlide vocabulary -------------------------------------------------------------

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel (mean of x and y), or None if unknown."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2

    def level_mpp(self, level: int) -> float | None:
        """Microns per pixel of `level`, or None if unknown."""
        self._check_level(level)
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (1% slack), as
        OpenSlide does; 0 for downsample < 1."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + _LEVEL_TOLERANCE):
                best = level
        return best

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose mpp is not coarser than `target_mpp` (1% slack).

        Reading that level and resizing by `level_mpp(level) / target_mpp` <= 1 never
        upsamples. A target finer than level 0 gives level 0.

        Raises:
            ImageReadError: the file does not state its resolution.
            ValueError: `target_mpp` is not positive.
        """
        if not target_mpp > 0:
            raise InputError(f"target_mpp must be positive, got {target_mpp}")
        if self.mpp is None:
            raise ImageReadError(self.path, "resolution (mpp) unknown, cannot choose a level")
        return self.get_best_level_for_downsample(target_mpp / self.mpp)

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        fill: int = 255,
    ) -> np.ndarray:
        """Read a region as RGB uint8, shape (h, w, 3).

        Args:
            location: (x, y) of the top-left corner in level-0 pixels (may be negative).
            level: pyramid level; the corner maps to `floor(location / level_downsample)`.
            size: (w, h) in pixels of `level`.
            fill: value (0-255) for the parts outside the image; default 255 (white, the
                background of a bright-field slide).

        Raises:
            ImageReadError: a tile or strip of the region fails to decode.
            ValueError: bad level, negative size or fill outside 0..255.
        """
        self._check_level(level)
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise InputError(f"size must be non-negative, got {size}")
        if not 0 <= fill <= 255:
            raise InputError(f"fill must be in 0..255, got {fill}")
        lv = self._levels[level]
        # level-0 -> level coordinates, per axis (downsamples may differ slightly in x and y)
        lx0 = math.floor(x * lv.width / self.dimensions[0])
        ly0 = math.floor(y * lv.height / self.dimensions[1])
        # intersection of [lx0, lx0 + w) x [ly0, ly0 + h) with the level, in level pixels
        ix0, iy0 = max(lx0, 0), max(ly0, 0)
        ix1, iy1 = min(lx0 + w, lv.width), min(ly0 + h, lv.height)
        inside = (ix0, iy0, ix1, iy1) == (lx0, ly0, lx0 + w, ly0 + h)
        if ix0 >= ix1 or iy0 >= iy1:
            return np.full((h, w, 3), fill, dtype=np.uint8)
        with self._reading():
            try:
                if lv.thread_safe:
                    raw = lv.read(iy0, iy1, ix0, ix1, self.read_workers)
                else:
                    with self._lock:
                        raw = lv.read(iy0, iy1, ix0, ix1, self.read_workers)
                rgb = lv.to_rgb(raw)  # (ih, iw, c) in the file's dtype -> (ih, iw, 3) uint8
            except Exception as e:
                raise ImageReadError(self.path,
                                     _region_cause(level, ix0, iy0, ix1, iy1, e)) from e
        if inside and rgb.flags.owndata:  # decoded for this call: no copy needed
            return rgb
        out = np.full((h, w, 3), fill, dtype=np.uint8)
        out[iy0 - ly0 : iy1 - ly0, ix0 - lx0 : ix1 - lx0] = rgb
        return out

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Count a read in flight (close waits for it); refuse reads once closed."""
        with self._idle:
            if self._closed:
                raise InputError(f"{self.path}: read from a closed SlideImage")
            self._reads_in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._reads_in_flight -= 1
                self._idle.notify_all()

    def jpeg_tiles(self, level: int, box: tuple[int, int, int, int]
                   ) -> list[tuple[tuple[int, int, int, int], bytes | None]] | None:
        """The JPEG tiles that cover `box` (y0, y1, x0, x1, in pixels of `level`, inside
        it) as complete JPEG files with their boxes in the level (clipped to it; None for a
        sparse tile, which reads as black), for a decoder of their own (nvJPEG on a GPU).
        None where the level is not baseline YCbCr JPEG tiles read by tifffile: read it with
        `read_region` then."""
        self._check_level(level)
        lv = self._levels[level]
        tiles = getattr(lv, "tiles", None)
        if tiles is None or not tiles.plain_jpeg:
            return None
        y0, y1, x0, x1 = box
        with self._reading():
            return [(tiles.segment_box(index), tiles.jpeg_file(index))
                    for index in tiles.segments(y0, y1, x0, x1)]

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as (h, w, 3) uint8; meant for small levels (thumbnails)."""
        self._check_level(level)
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def close(self) -> None:
        """Release the file handles once the reads in flight are done; further reads raise
        ValueError."""
        with self._idle:
            self._closed = True
            while self._reads_in_flight:
                self._idle.wait()
        with self._lock:
            for lv in self._levels:
                lv.close()
            if self._handle is not None:
                self._handle.close()
                self._handle = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SlideImage({str(self.path)!r}, dimensions={self.dimensions}, "
            f"level_count={self.level_count}, mpp={self.mpp})"
        )

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self._levels):
            raise InputError(f"level must be in 0..{len(self._levels) - 1}, got {level}")

    # ---- backends -------------------------------------------------------------------------

    def _open_tiff(self) -> None:
        import tifffile

        self._handle = tifffile.TiffFile(self.path)
        tf = self._handle
        if not tf.series:
            raise ImageReadError(self.path, "TIFF holds no image")
        self.vendor = next((flavour for flavour in ("svs", "ome", "ndpi", "scn", "philips",
                                                    "bif", "qpi", "imagej")
                            if getattr(tf, f"is_{flavour}", False)), "generic-tiff")
        self.properties = {tag.name: str(tag.value)[:200] for tag in tf.pages.first.tags
                           if tag.name not in ("TileOffsets", "TileByteCounts",
                                               "StripOffsets", "StripByteCounts")}
        self._associated = {series.name.lower(): series.asarray for series in tf.series[1:]
                            if (series.name or "").lower() in _ASSOCIATED_SERIES}
        file_size = os.path.getsize(self.path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        levels = []
        for series, index in _pyramid_levels(tf):
            _check_tiff_level(self.path, series.levels[index], len(levels), file_size)
            levels.append(_TiffLevel(series, index, self._fd))
        self._levels = [lv for lv in levels if lv.width > 0 and lv.height > 0]
        if len(self._levels) < len(levels) or not self._levels:
            raise ImageReadError(self.path, "zero-sized image")
        self._levels.sort(key=lambda lv: -lv.width * lv.height)
        if np.dtype(self._levels[0].dtype).kind == "f":
            scale = 255.0
            smallest = self._levels[-1]
            if smallest.width * smallest.height <= _FLOAT_PROBE_MAX_PIXELS:
                probe = smallest.read(0, smallest.height, 0, smallest.width)
                if probe.size and np.nanmax(probe) > 1:
                    scale = 1.0
            for lv in self._levels:
                lv.float_scale = scale
        self.mpp_x, self.mpp_y = _tiff_mpp(tf)

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as (h, w, 3) uint8."""
        if name not in self._associated:
            raise InputError(f"{self.path}: no associated image {name!r} (has: "
                             f"{', '.join(self._associated) or 'none'})")
        with self._lock:
            return to_rgb8(np.asarray(self._associated[name]()))

    @property
    def associated(self) -> tuple[str, ...]:
        return tuple(self._associated)

    def _open_openslide(self) -> None:
        openslide = _import_openslide(self.path)
        try:
            slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise ImageReadError(self.path, "not a format OpenSlide reads") from e
        except openslide.OpenSlideError as e:
            raise ImageReadError(self.path, f"OpenSlide cannot read it: {e}") from e
        self._handle = slide  # closed with the object
        self.properties = dict(slide.properties)
        self.vendor = self.properties.get("openslide.vendor")
        background = _hex_colour(self.properties.get("openslide.background-color"))
        handles = _OpenSlideHandles(openslide, self.path, slide)
        self._levels = [_OpenSlideLevel(handles, level, background)
                        for level in range(slide.level_count)]
        self.mpp_x = positive_number(self.properties.get("openslide.mpp-x"))
        self.mpp_y = positive_number(self.properties.get("openslide.mpp-y"))
        self._associated = {name: (lambda name=name: slide.associated_images[name])
                            for name in slide.associated_images}

    def _open_pillow(self) -> None:
        from PIL import Image, UnidentifiedImageError

        with _PIL_LOCK:
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max(previous or 0, PIL_MAX_PIXELS)
            try:
                with Image.open(self.path) as im:
                    w, h = im.size
                    if w * h == 0:
                        raise ImageReadError(self.path, "zero-sized image")
                    if w * h > PIL_MAX_PIXELS:
                        raise ImageReadError(
                            self.path,
                            f"{w}x{h} exceeds sstream.io.PIL_MAX_PIXELS={PIL_MAX_PIXELS} for a "
                            "non-tiled format; convert it to a tiled pyramidal TIFF",
                        )
                    im.load()
                    rgb = _pillow_to_rgb8(im)
            except UnidentifiedImageError as e:
                raise ImageReadError(self.path, "not a recognised image format") from e
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        self._levels = [_ArrayLevel(rgb)]


# series tifffile names that are pictures of the slide, not levels of its pyramid
_ASSOCIATED_SERIES = {"thumbnail", "label", "macro", "overview"}


def _pyramid_levels(tf) -> list[tuple[object, int]]:
    """(series, level index) of every resolution of the first image: its series' levels,
    then any reduced-resolution image tifffile lists as a series of its own (it joins only
    2x and 4x steps into one pyramid: an 8x step, at top level marked reduced or in a SubIFD,
    comes out as a second one-level series). Such an image counts when it is marked reduced
    (NewSubfileType bit 0) or is a SubIFD, has the first image's samples and dtype, is
    smaller, and has its aspect ratio (within a pixel of rounding)."""
    base = tf.series[0]
    levels = [(base, index) for index in range(len(base.levels))]
    height, width = _yx(base.levels[0])
    sizes = {_yx(base.levels[i]) for i in range(len(base.levels))}
    for series in tf.series[1:]:
        keyframe = series.levels[0].keyframe
        reduced = bool(getattr(keyframe, "subfiletype", 0) & 1) or bool(
            getattr(keyframe, "is_subifd", False))
        if not reduced or (series.name or "").lower() in _ASSOCIATED_SERIES:
            continue
        if series.dtype != base.dtype or _samples(series) != _samples(base):
            continue
        for index in range(len(series.levels)):
            h, w = _yx(series.levels[index])
            factor = width / w
            if (h, w) in sizes or not 1 < factor or abs(height / factor - h) > 1.01:
                continue
            sizes.add((h, w))
            levels.append((series, index))
    return levels


def _yx(level_series) -> tuple[int, int]:
    axes, shape = level_series.axes, level_series.shape
    return shape[axes.index("Y")], shape[axes.index("X")]


def _samples(series) -> int:
    axes = series.axes
    return series.shape[axes.index("S")] if "S" in axes else 1


class _Level:
    """One resolution level: size and a raw reader returning (h, w, c) in file dtype,
    decoding on up to `workers` threads. `thread_safe` levels are read without the slide's
    lock."""

    width: int
    height: int
    dtype: np.dtype
    thread_safe = False

    def read(self, y0: int, y1: int, x0: int, x1: int, workers: int = 1) -> np.ndarray:
        raise NotImplementedError

    def to_rgb(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def close(self) -> None:
        pass


class _OpenSlideHandles:
    """An OpenSlide handle per reading thread (OpenSlide is thread-safe, but one handle's
    caches and locks are shared by every read): the first is the one opened at open."""

    def __init__(self, openslide, path: Path, first) -> None:  # noqa: ANN001
        self._openslide, self._path = openslide, path
        self._local = threading.local()
        self._local.slide = first
        self._all = [first]
        self._lock = threading.Lock()

    def get(self):  # noqa: ANN201
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._local.slide = self._openslide.OpenSlide(str(self._path))
            with self._lock:
                self._all.append(slide)
        return slide

    def close(self) -> None:
        with self._lock:
            for slide in self._all[1:]:  # the first is the SlideImage's own handle
                slide.close()
            del self._all[1:]


class _OpenSlideLevel(_Level):
    """A level read by OpenSlide: RGBA regions in level-0 coordinates, composited over the
    slide's background colour. A region is read in bands, one per worker, each through its
    thread's own handle."""

    thread_safe = True
    _MIN_BAND_PIXELS = 256 * 1024  # smaller regions are read in one call

    def __init__(self, handles: _OpenSlideHandles, level: int, background: np.ndarray):
        self._handles, self._level = handles, level
        slide = handles.get()
        self.width, self.height = slide.level_dimensions[level]
        self._downsample = slide.level_downsamples[level]
        self.dtype = np.dtype(np.uint8)
        self._background = background

    def read(self, y0: int, y1: int, x0: int, x1: int, workers: int = 1) -> np.ndarray:
        if self._downsample != round(self._downsample):
            # OpenSlide paints such a level at a sub-pixel phase that depends on where a read
            # starts: bands would not join up to the region read whole
            return self._read_band(y0, y1, x0, x1)
        out = np.empty((y1 - y0, x1 - x0, 4), np.uint8)
        rows = max(1, min(y1 - y0, -(-(y1 - y0) // workers),
                          max(1, self._MIN_BAND_PIXELS // max(1, x1 - x0))))

        def band(by0: int) -> None:
            by1 = min(by0 + rows, y1)
            out[by0 - y0:by1 - y0] = self._read_band(by0, by1, x0, x1)

        run_parallel([lambda by0=by0: band(by0) for by0 in range(y0, y1, rows)], workers)
        return out

    def _read_band(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # OpenSlide maps a level-0 location to floor(location / downsample): the smallest
        # location in [x0 * ds, (x0 + 1) * ds) lands on x0 whatever the rounding of ds
        location = (math.ceil(x0 * self._downsample), math.ceil(y0 * self._downsample))
        region = self._handles.get().read_region(location, self._level, (x1 - x0, y1 - y0))
        return np.asarray(region)

    def close(self) -> None:
        self._handles.close()

    def to_rgb(self, raw: np.ndarray) -> np.ndarray:
        return _composite(raw[..., :3], raw[..., 3:4], self._background)


class _ArrayLevel(_Level):
    """A level already decoded to (h, w, 3) uint8 in memory (Pillow formats)."""

    thread_safe = True

    def __init__(self, rgb: np.ndarray):
        self._rgb = rgb
        self.height, self.width = rgb.shape[:2]
        self.dtype = rgb.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int, workers: int = 1) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1]


class _TiffLevel(_Level):
    """A tifffile series level: a single-plane page reads its tiles itself, in parallel
    (`TiffTiles`); other layouts go through a zarr array of the series (only intersecting
    chunks are decoded), one region at a time."""

    def __init__(self, series, index: int, fd: int):
        import zarr

        level_series = series.levels[index]
        self.tiles = TiffTiles(level_series.pages[0], fd) if TiffTiles.supports(
            level_series) else None
        self.thread_safe = self.tiles is not None
        self._store = series.aszarr(level=index)
        self._array = zarr.open(self._store, mode="r")
        axes = level_series.axes
        shape = level_series.shape
        self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
        self.dtype = level_series.dtype
        self._axes = axes
        sample_axis = "S" if "S" in axes else ("C" if "C" in axes else None)
        self._sample_axis = sample_axis
        keyframe = level_series.keyframe
        self.photometric = int(keyframe.photometric)
        colormap = getattr(keyframe, "colormap", None)
        self.palette = None
        if self.photometric == 3 and colormap is not None:
            cmap = np.asarray(colormap)
            lut = cmap >> 8 if cmap.max() > 255 else cmap
            self.palette = np.ascontiguousarray(lut.T.astype(np.uint8))  # (n, 3)
        self.float_scale = 255.0

    def read(self, y0: int, y1: int, x0: int, x1: int, workers: int = 1) -> np.ndarray:
        if self.tiles is not None:
            return self.tiles.read(y0, y1, x0, x1, workers)
        index = []
        kept = []
        for ax in self._axes:
            if ax == "Y":
                index.append(slice(y0, y1))
                kept.append(ax)
            elif ax == "X":
                index.append(slice(x0, x1))
                kept.append(ax)
            elif ax == self._sample_axis:
                index.append(slice(None))
                kept.append(ax)
            else:
                index.append(0)  # first plane of any other axis
        raw = np.asarray(self._array[tuple(index)])
        if self._sample_axis is None:
            return raw[..., None]
        return np.moveaxis(raw, kept.index(self._sample_axis), -1)

    def to_rgb(self, raw: np.ndarray) -> np.ndarray:
        if self.palette is not None:
            return self.palette[np.clip(raw[..., 0], 0, len(self.palette) - 1)]
        rgb = to_rgb8(raw, float_scale=self.float_scale)
        if self.photometric == 0:  # MinIsWhite
            rgb = 255 - rgb
        return rgb

    def close(self) -> None:
        self._store.close()


def read_downsampled(slide: SlideImage, level: int, shape: tuple[int, int]) -> np.ndarray:
    """Level `level` of the slide as RGB uint8 of `shape` (h, w), smaller than the level:
    read from the coarsest pyramid level still finer than `shape`, box-filtered, in bands
    (never a whole level in memory). For thumbnails, overviews and tissue detection."""
    from PIL import Image

    out_h, out_w = shape
    level_w, level_h = slide.level_dimensions[level]
    target_downsample = slide.level_downsamples[level] * max(level_w / out_w, level_h / out_h)
    read_level = slide.get_best_level_for_downsample(target_downsample)
    read_w, read_h = slide.level_dimensions[read_level]
    factor = max(1, int(target_downsample / slide.level_downsamples[read_level]))
    scale_y = slide.dimensions[1] / read_h
    rows_per_band = factor * max(1, (1 << 20) // (factor * factor * read_w))
    reduced = np.empty((-(-read_h // factor), -(-read_w // factor), 3), np.uint8)
    for y0 in range(0, read_h, rows_per_band):  # bands of whole factor x factor boxes
        rows = min(rows_per_band, read_h - y0)
        band = slide.read_region((0, math.ceil(y0 * scale_y)), read_level, (read_w, rows))
        small = np.asarray(Image.fromarray(band).reduce(factor))
        reduced[y0 // factor:y0 // factor + small.shape[0]] = small
    return np.asarray(Image.fromarray(reduced).resize((out_w, out_h), Image.Resampling.BOX))


def to_rgb8(raw: np.ndarray, float_scale: float = 255.0) -> np.ndarray:
    """Convert (h, w, c) pixels of any dtype to (h, w, 3) uint8 by the module's rule.

    `float_scale` multiplies float values before clipping to [0, 255]: 255 for [0, 1] data,
    1 for [0, 255] data.
    """
    if raw.ndim == 2:
        raw = raw[..., None]
    v = _to_uint8(raw, float_scale)
    c = v.shape[-1]
    if c == 1:
        return np.repeat(v, 3, axis=-1)
    if c == 2:
        return _composite(np.repeat(v[..., :1], 3, axis=-1), v[..., 1:2])
    if c == 3:
        return v
    if c == 4:
        return _composite(v[..., :3], v[..., 3:4])
    return np.ascontiguousarray(v[..., :3])


def _to_uint8(raw: np.ndarray, float_scale: float) -> np.ndarray:
    kind, bits = raw.dtype.kind, raw.dtype.itemsize * 8
    if raw.dtype == np.uint8:
        return raw
    if kind == "b":
        return raw.astype(np.uint8) * np.uint8(255)
    if kind == "u":
        return (raw >> (bits - 8)).astype(np.uint8)
    if kind == "i":
        top = np.iinfo(raw.dtype).max
        v = np.clip(raw.astype(np.int64), 0, top)
        return (v * 255 // top).astype(np.uint8)
    if kind == "f":
        v = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return np.rint(np.clip(v * np.float32(float_scale), 0, 255)).astype(np.uint8)
    raise InputError(f"unsupported pixel type {raw.dtype}")


def _composite(rgb: np.ndarray, alpha: np.ndarray,
               background: np.ndarray | int = 255) -> np.ndarray:
    """8-bit colour over a background (white unless given) by its 8-bit alpha."""
    c = rgb.astype(np.int32)
    a = alpha.astype(np.int32)
    return ((c * a + np.asarray(background, np.int32) * (255 - a) + 127) // 255).astype(
        np.uint8)


def _pillow_to_rgb8(im) -> np.ndarray:
    """Pillow image -> (h, w, 3) uint8 under the same rule as TIFFs."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return to_rgb8(np.asarray(im))
    if mode in ("RGBA", "LA"):
        return to_rgb8(np.asarray(im))
    if mode in ("P", "PA", "La", "RGBa"):
        return to_rgb8(np.asarray(im.convert("RGBA")))
    if mode == "1":
        return to_rgb8(np.asarray(im).astype(bool))
    if mode.startswith("I;16"):
        return to_rgb8(np.asarray(im).astype(np.uint16))
    if mode == "I":
        return to_rgb8(np.asarray(im).astype(np.int32))
    if mode == "F":
        arr = np.asarray(im).astype(np.float32)
        scale = 1.0 if arr.size and np.nanmax(arr) > 1 else 255.0
        return to_rgb8(arr, float_scale=scale)
    return to_rgb8(np.asarray(im.convert("RGB")))


def _check_tiff_level(path: Path, level_series, index: int, file_size: int) -> None:
    """Fail at open, not mid-training, on what can be checked without decoding pixels."""
    import tifffile

    for page in level_series.pages:
        if page is None:
            raise ImageReadError(path, f"level {index}: missing page")
        keyframe = page.keyframe if page.keyframe is not None else page
        compression = int(keyframe.compression)
        try:
            tifffile.TIFF.DECOMPRESSORS[compression]
        except (KeyError, NotImplementedError, ImportError) as e:
            name = getattr(keyframe.compression, "name", str(compression))
            raise ImageReadError(
                path, f"level {index}: unsupported TIFF compression {name} ({compression})"
            ) from e
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if len(offsets) == 0 or len(offsets) != len(counts):
            raise ImageReadError(
                path, f"level {index}: the tile/strip offset table is missing or unreadable "
                "(truncated or corrupt file)"
            )
        present = (offsets > 0) & (counts > 0)
        if np.any(offsets[present] + counts[present] > file_size):
            raise ImageReadError(
                path, f"level {index}: truncated file (image data extends past the end)"
            )


def _tiff_mpp(tf) -> tuple[float | None, float | None]:
    """(mpp_x, mpp_y) from Aperio description, OME metadata or resolution tags."""
    page = tf.pages.first
    description = page.description or ""
    if tf.is_svs or description.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
        if m:
            mpp = positive_number(m.group(1))
            if mpp is not None:
                return mpp, mpp
    if tf.is_ome and tf.ome_metadata:
        mpp_xy = _ome_mpp(tf.ome_metadata)
        if mpp_xy is not None:
            return mpp_xy
    unit = page.tags.valueof("ResolutionUnit")
    microns_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit) if unit is not None else 2)
    if microns_per_unit is None:
        return None, None
    xres, yres = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
    mpp_x = _mpp_from_rational(xres, microns_per_unit)
    mpp_y = _mpp_from_rational(yres, microns_per_unit)
    if mpp_x is None or mpp_y is None:
        return None, None
    return mpp_x, mpp_y


_OME_UNIT_MICRONS = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3}


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            sizes = []
            for axis in "XY":
                value = positive_number(element.get(f"PhysicalSize{axis}"))
                unit = element.get(f"PhysicalSize{axis}Unit", "µm")
                if value is None or unit not in _OME_UNIT_MICRONS:
                    return None
                sizes.append(value * _OME_UNIT_MICRONS[unit])
            return sizes[0], sizes[1]
    return None


def _mpp_from_rational(value, microns_per_unit: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        if len(value) != 2 or value[1] == 0:
            return None
        value = value[0] / value[1]
    pixels_per_unit = positive_number(value)
    if pixels_per_unit is None or pixels_per_unit == 1.0:  # 1/1 is the "unset" default
        return None
    return microns_per_unit / pixels_per_unit


def positive_number(text: object) -> float | None:
    """`text` as a positive finite number, or None (missing, not a number, not positive):
    how a metadata value or a CSV cell that should hold a resolution is read."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _choose_backend(path: Path, magic: bytes, backend: str) -> str:
    """tifffile, pillow or openslide for the file (see SlideImage)."""
    if backend == "openslide":
        return "openslide"
    if backend == "tifffile":
        if magic not in _TIFF_MAGIC:
            raise ImageReadError(path, "--backend tifffile reads TIFF files only")
        return "tifffile"
    if magic in _TIFF_MAGIC:  # OpenSlide is asked only about the TIFFs it lays out better
        if path.suffix.lower() not in _OPENSLIDE_TIFF_SUFFIXES:
            return "tifffile"
        return "openslide" if _openslide_vendor(path) in _OPENSLIDE_VENDORS else "tifffile"
    if _openslide_vendor(path) is not None:
        return "openslide"
    if path.suffix.lower() in _OPENSLIDE_SUFFIXES:
        _import_openslide(path)  # not installed: its error names the extra
        raise ImageReadError(path, f"OpenSlide does not recognise this {path.suffix} file")
    return "pillow"


def _openslide_vendor(path: Path) -> str | None:
    """The format OpenSlide detects, or None (also when OpenSlide is not installed)."""
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def _import_openslide(path: Path):  # noqa: ANN202
    try:
        import openslide
    except ImportError:
        raise ImageReadError(path, "reading this format needs OpenSlide: "
                                   f"{_OPENSLIDE_EXTRA}") from None
    return openslide


def _hex_colour(text: str | None) -> np.ndarray:
    """'RRGGBB' -> (3,) int32; white when absent or malformed."""
    try:
        return np.array([int(text[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.int32)
    except (TypeError, ValueError, IndexError):
        return np.full(3, 255, dtype=np.int32)


def _region_cause(level: int, x0: int, y0: int, x1: int, y1: int, e: BaseException) -> str:
    name = type(e).__name__
    return f"cannot decode level {level} pixels x {x0}:{x1}, y {y0}:{y1} ({name}: {e})"
