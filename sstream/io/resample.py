"""Slides read at an exact physical pixel size: anti-aliased resampling whose region reads
equal the whole level resampled at once, pixel for pixel.

`resolve_read(slide, mpp=X)` picks the finest pyramid level that is not coarser than X µm/px
(OpenSlide's `get_best_level_for_downsample`, 1% slack) and the scale that brings it to X:
`scale = X / level_mpp` level pixels per output pixel, per axis (>= 1 shrinks). A level
within SAME_SCALE of X is read as it is. `ResampledLevel` then hands out regions of the
resampled image, reading only the level's pixels those regions need.

The filter is Pillow's antialiased BICUBIC (Keys' cubic, a = -0.5, support 2 output pixels
when shrinking: `Image.resize` with `box`), with Pillow's rules: output pixel j is centred at
level coordinate c = (j + 0.5) * scale; the taps are the level pixels x with
floor(c - r + 0.5) <= x < floor(c + r + 0.5), r = 2 * max(scale, 1), weighted
cubic((x + 0.5 - c) / max(scale, 1)); taps outside the level are dropped and the rest
renormalised. Pillow itself cannot be asked for a region: its coefficients are computed
relative to the region's corner, so a region's float rounding differs from the whole
level's, and it rounds to uint8 between its two passes. Here each axis's weights depend on
the global output index only, are quantised to WEIGHT_BITS fixed point (summing to exactly
2**WEIGHT_BITS, so flat areas stay flat), and both passes (scipy's sparse products) sum
integers exactly, whatever the order: any region equals the same region of the whole-level
resample exactly (tested; and within two grey levels of Pillow's own resize, which rounds
between passes). A region's read carries the filter's margin: the taps of its first and
last rows and columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from sstream.errors import InputError
from sstream.io.reader import ImageReadError, SlideImage

__all__ = ["SAME_SCALE", "ResampledLevel", "Resolution", "resample_array", "resolve_read"]

SAME_SCALE = 1e-3  # a level within 0.1% of the asked mpp is read as it is (1 px in 1000)
WEIGHT_BITS = 14
_SUPPORT = 2.0  # bicubic, in output pixels
_A = -0.5       # Keys' parameter, as Pillow's BICUBIC

Reader = Callable[[int, int, int, int], np.ndarray]
"""(y0, y1, x0, x1) in level pixels, inside the level -> uint8 (y1 - y0, x1 - x0, 3)."""


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * _A - 4 * _A
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@dataclass(frozen=True)
class _Axis:
    """One axis of the resampling: `in_size` level pixels to `out_size` output pixels,
    `scale` level pixels per output pixel."""

    in_size: int
    out_size: int
    scale: float

    def taps(self, out0: int, out1: int) -> tuple[np.ndarray, np.ndarray]:
        """(level index (n, K), integer weight (n, K)) of outputs out0..out1 - 1; each row's
        weights sum to 2**WEIGHT_BITS. A function of the global index alone."""
        stretch = max(self.scale, 1.0)
        support = _SUPPORT * stretch
        width = 2 * math.ceil(support) + 1
        centre = (np.arange(out0, out1, dtype=np.float64) + 0.5) * self.scale  # (n,)
        first = np.floor(centre - support + 0.5).astype(np.int64)
        last = np.minimum(np.floor(centre + support + 0.5).astype(np.int64), self.in_size)
        index = first[:, None] + np.arange(width)[None, :]  # (n, K)
        inside = (index >= 0) & (index < last[:, None])
        weight = np.where(inside, _cubic((index + 0.5 - centre[:, None]) / stretch), 0.0)
        total = np.zeros_like(centre)
        for k in range(width):  # a fixed order: the same sum for every region
            total += weight[:, k]
        fixed = np.rint(weight / total[:, None] * (1 << WEIGHT_BITS)).astype(np.int64)
        rows = np.arange(len(centre))
        fixed[rows, np.argmax(fixed, axis=1)] += (1 << WEIGHT_BITS) - fixed.sum(axis=1)
        return np.clip(index, 0, self.in_size - 1), fixed


def _band_matrix(axis: _Axis, out0: int, out1: int) -> tuple[sparse.csr_matrix, int, int]:
    """Outputs out0..out1 - 1 of `axis` as a sparse (n, span) matrix of integer weights
    over level pixels first..first + span - 1: (matrix, first, span)."""
    index, weight = axis.taps(out0, out1)
    first, span = int(index.min()), int(index.max()) + 1 - int(index.min())
    rows = np.repeat(np.arange(index.shape[0]), index.shape[1])
    columns = (index - first).ravel()
    matrix = sparse.csr_matrix((weight.ravel().astype(np.float64), (rows, columns)),
                               shape=(index.shape[0], span))
    return matrix, first, span


def _resample(read: Reader, axes: tuple[_Axis, _Axis], box: tuple[int, int, int, int]
              ) -> np.ndarray:
    """The box (y0, y1, x0, x1) of the output, inside it, from the level `read` reads: rows,
    then columns, each a sparse product of integer weights and integer values. Every partial
    sum is an integer that the float type holds exactly (rows: below 255 * 1.5 * 2**14 <
    2**24 in float32; columns: below 2**53 in float64), so the sums do not depend on their
    order; rounded once at the end."""
    y0, y1, x0, x1 = box
    rows, sy0, height = _band_matrix(axes[0], y0, y1)
    cols, sx0, width = _band_matrix(axes[1], x0, x1)
    level = read(sy0, sy0 + height, sx0, sx0 + width)  # (height, width, 3) uint8
    down = rows.astype(np.float32) @ level.reshape(height, width * 3).astype(np.float32)
    by_column = np.ascontiguousarray(down.reshape(y1 - y0, width, 3).transpose(1, 0, 2),
                                     dtype=np.float64).reshape(width, -1)
    across = cols @ by_column  # (nx, ny * 3)
    across += 1 << (2 * WEIGHT_BITS - 1)
    across *= 2.0 ** (-2 * WEIGHT_BITS)  # a power of two: exact
    np.floor(across, out=across)
    np.clip(across, 0, 255, out=across)
    out = across.astype(np.uint8).reshape(x1 - x0, y1 - y0, 3)
    return np.ascontiguousarray(out.transpose(1, 0, 2))


def _output_size(in_size: int, scale: float) -> int:
    return max(1, round(in_size / scale))


def resample_array(rgb: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """A whole uint8 (H, W, 3) image resampled by `scale` (y, x): level pixels per output
    pixel, round(H / scale_y) x round(W / scale_x) output pixels. The reference the region
    reads of `ResampledLevel` equal."""
    height, width = rgb.shape[:2]
    axes = (_Axis(height, _output_size(height, scale[0]), scale[0]),
            _Axis(width, _output_size(width, scale[1]), scale[1]))

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return rgb[y0:y1, x0:x1]

    return _resample(read, axes, (0, axes[0].out_size, 0, axes[1].out_size))


@dataclass(frozen=True)
class Resolution:
    """How a slide is read: which level, and the scale from it to the image the model sees.

    Attributes:
        level: the pyramid level read.
        scale: (y, x) level pixels per output pixel; (1.0, 1.0) reads the level as it is.
        mpp: µm per output pixel (mean of x and y), None where the slide states none.
        size: (width, height) of the image read.
    """

    level: int
    scale: tuple[float, float]
    mpp: float | None
    size: tuple[int, int]

    @property
    def resampled(self) -> bool:
        return self.scale != (1.0, 1.0)

    @property
    def resize(self) -> float:
        """The factor the level is resized by (0.5: halved; 1.0: read as it is)."""
        return 2 / (self.scale[0] + self.scale[1])


def resolve_read(slide: SlideImage, level: int | None = None, mpp: float | None = None,
                 assume_mpp: float | None = None) -> Resolution:
    """The Resolution for `level` (read as it is), `mpp` (exactly that many µm per pixel,
    see the module docstring) or neither (level 0). `assume_mpp` is level 0's µm per pixel
    for a slide that states none (a stated one wins).

    Raises:
        ValueError: a level the slide does not have, or both level and mpp.
        ImageReadError: `mpp` for a slide that states no resolution, without `assume_mpp`.
    """
    if level is not None and mpp is not None:
        raise InputError("give --level or --mpp, not both")
    base = (slide.mpp_y, slide.mpp_x) if slide.mpp is not None else (assume_mpp, assume_mpp)
    if mpp is None:
        chosen = level or 0
        if not 0 <= chosen < slide.level_count:
            raise InputError(f"{slide.path}: level {chosen} does not exist (the file has "
                             f"levels 0..{slide.level_count - 1})")
        return _native(slide, chosen, base)
    if base[0] is None:
        raise ImageReadError(slide.path, f"states no resolution (µm per pixel), so it cannot "
                                         f"be read at {mpp:g} µm/px: give --assume-mpp (its "
                                         "level 0's µm per pixel) or an mpp column in the CSV")
    assert base[1] is not None
    chosen = slide.get_best_level_for_downsample(mpp / ((base[0] + base[1]) / 2))
    width, height = slide.level_dimensions[chosen]
    level_mpp = (base[0] * slide.dimensions[1] / height, base[1] * slide.dimensions[0] / width)
    scale = (mpp / level_mpp[0], mpp / level_mpp[1])
    if all(abs(s - 1) <= SAME_SCALE for s in scale):
        return _native(slide, chosen, base)
    size = (_output_size(width, scale[1]), _output_size(height, scale[0]))
    return Resolution(chosen, scale, mpp, size)


def _native(slide: SlideImage, level: int, base: tuple[float | None, float | None]
            ) -> Resolution:
    width, height = slide.level_dimensions[level]
    mpp = None if base[0] is None or base[1] is None else \
        (base[0] + base[1]) / 2 * slide.level_downsamples[level]
    return Resolution(level, (1.0, 1.0), mpp, (width, height))


class ResampledLevel:
    """A slide level at a Resolution, read region by region (regions in output pixels).

    `read(y0, y1, x0, x1)` returns uint8 (y1 - y0, x1 - x0, 3); regions may cross the border
    (white outside). `level0(y, x)` places output coordinates on the slide's level 0, and
    `from_level0` is its inverse.
    """

    def __init__(self, slide: SlideImage, resolution: Resolution) -> None:
        self.slide, self.resolution = slide, resolution
        self.level = resolution.level
        level_width, level_height = slide.level_dimensions[self.level]
        self.width, self.height = resolution.size
        scale_y, scale_x = resolution.scale
        self._axes = (_Axis(level_height, self.height, scale_y),
                      _Axis(level_width, self.width, scale_x))
        # output pixel -> level-0 pixel, per axis
        self.to_level0 = (scale_y * slide.dimensions[1] / level_height,
                          scale_x * slide.dimensions[0] / level_width)
        self._level_to_level0 = (slide.dimensions[1] / level_height,
                                 slide.dimensions[0] / level_width)

    def level0(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return y * self.to_level0[0], x * self.to_level0[1]

    def from_level0(self, y: float, x: float) -> tuple[float, float]:
        return y / self.to_level0[0], x / self.to_level0[1]

    def _read_level(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # level pixels -> level-0 location; read_region floors it back to the same pixel
        location = (math.ceil(x0 * self._level_to_level0[1]),
                    math.ceil(y0 * self._level_to_level0[0]))
        return self.slide.read_region(location, self.level, (x1 - x0, y1 - y0))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if not self.resolution.resampled:
            return self._read_level(y0, y1, x0, x1)
        iy0, iy1 = max(y0, 0), min(y1, self.height)
        ix0, ix1 = max(x0, 0), min(x1, self.width)
        if iy0 >= iy1 or ix0 >= ix1:
            return np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        inside = _resample(self._read_level, self._axes, (iy0, iy1, ix0, ix1))
        if (iy0, iy1, ix0, ix1) == (y0, y1, x0, x1):
            return inside
        out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = inside
        return out
