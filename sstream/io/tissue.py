"""Tissue masks of bright-field slides: which parts are tissue, not glass.

A `TissueMask` is a bool array over the whole slide at low resolution: mask pixel (i, j)
covers level-0 pixels [i*sy, (i+1)*sy) x [j*sx, (j+1)*sx), `scale` = (sx, sy).

`detect_tissue(slide)` segments a thumbnail at DETECTION_MPP (8 µm per pixel, the scale
pathology pipelines segment tissue at, 16x below a 20x scan) read from the nearest pyramid
level, as CLAM and HistoQC-style preprocessing do, in four steps (`tissue_from_rgb`):

1. colour: saturation s = (max - min) / max of R, G, B and value v = max / 255 per pixel.
   Glass, white or the grey and slightly tinted glass of real scanners, is unsaturated
   (s < 0.06); stains are not.
2. threshold: Otsu's threshold on s, kept where the class below it looks like glass (mean
   s < GLASS_SATURATION and mean v > GLASS_VALUE); a slide that is all tissue has no glass
   class, so there only the floor MIN_SATURATION applies, as it always does (noise on glass).
3. ink and dirt: near-black pixels (v < INK_VALUE: black pen, dirt) and strongly saturated
   green to blue ones (hue in INK_HUES: the markers pathologists circle tissue with) are
   not tissue, whatever their saturation.
4. clean-up: 8-connected tissue components smaller than MIN_TISSUE_UM2 (dust, debris,
   fragments of pen lines) are removed, and holes smaller than MAX_HOLE_UM2 (lumina, fat,
   ink inside tissue) are filled; a hole is background not touching the slide's border.

`read_tissue_mask(path, slide)` reads a mask image of any size (QuPath's exported label
images, a hand-painted PNG): non-zero = tissue, covering the whole slide, so its aspect
must be the slide's; or QuPath's exported annotations as GeoJSON (.geojson, .json:
polygons in level-0 pixels, holes included), rasterised at MAX_DETECTION_SIDE on the longer
side (`sstream.io.geojson`). `tissue_preview` draws a mask over the slide for a person to
check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sstream.io.reader import ImageReadError, SlideImage, open_image, read_downsampled

__all__ = ["DETECTION_MPP", "TissueMask", "detect_tissue", "fill_holes", "read_tissue_mask",
           "remove_small_components", "tissue_from_rgb", "tissue_preview"]

DETECTION_MPP = 8.0         # µm per mask pixel
ASSUMED_MPP = 0.5           # µm per level-0 pixel where the file does not say (a 20x scan)
MAX_DETECTION_SIDE = 8192   # mask pixels on the longer side, whatever the resolution
GEOJSON_SUFFIXES = (".geojson", ".json")  # mask files read as QuPath's annotations
MIN_SATURATION = 0.07       # never tissue below (glass noise, the tint of grey glass)
GLASS_SATURATION = 0.10     # the class below Otsu's threshold is glass if less saturated
GLASS_VALUE = 0.70          # ... and brighter than this on average
INK_VALUE = 0.18            # darker than this: ink or dirt
INK_HUES = (90.0, 240.0)    # degrees: green to blue markers ...
INK_SATURATION = 0.35       # ... when at least this saturated
MIN_TISSUE_UM2 = 20_000.0   # smaller tissue components are dust (about 140 x 140 µm)
MAX_HOLE_UM2 = 20_000.0     # smaller holes in tissue are filled


@dataclass(frozen=True)
class TissueMask:
    """A bool mask (h, w) over the whole slide; `scale` (sx, sy): level-0 pixels per mask
    pixel; `source`: "auto" (detected) or the mask file it was read from."""

    mask: np.ndarray
    scale: tuple[float, float]
    source: str

    @property
    def fraction(self) -> float:
        """Share of the slide that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def random_point(self, generator: np.random.Generator) -> tuple[float, float] | None:
        """A point (x, y) in level-0 pixels drawn uniformly from the tissue (the centre of a
        random tissue pixel of the mask), or None where there is no tissue."""
        rows, cols = np.nonzero(self.mask)
        if not len(rows):
            return None
        pick = int(generator.integers(len(rows)))
        return (cols[pick] + 0.5) * self.scale[0], (rows[pick] + 0.5) * self.scale[1]

    def sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether level-0 points (x, y) (arrays that broadcast) lie on tissue; points
        outside the slide do not."""
        height, width = self.mask.shape
        col = np.floor(np.asarray(x, dtype=np.float64) / self.scale[0]).astype(np.int64)
        row = np.floor(np.asarray(y, dtype=np.float64) / self.scale[1]).astype(np.int64)
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        return inside & self.mask[row.clip(0, height - 1), col.clip(0, width - 1)]


def detect_tissue(slide: SlideImage) -> TissueMask:
    """The tissue of a bright-field slide, found on a thumbnail (module docstring)."""
    width, height = slide.dimensions
    mpp = slide.mpp or ASSUMED_MPP
    downsample = max(1.0, DETECTION_MPP / mpp, max(width, height) / MAX_DETECTION_SIDE)
    shape = (max(1, round(height / downsample)), max(1, round(width / downsample)))
    rgb = read_downsampled(slide, 0, shape)
    mask = tissue_from_rgb(rgb, mpp * width / shape[1])
    return TissueMask(mask, (width / shape[1], height / shape[0]), "auto")


def tissue_from_rgb(rgb: np.ndarray, um_per_pixel: float) -> np.ndarray:
    """Steps 1-4 of the module docstring on an RGB uint8 thumbnail (h, w, 3) whose pixels
    are `um_per_pixel` µm wide; a bool mask (h, w)."""
    colour = rgb.astype(np.float32) / 255.0
    high, low = colour.max(axis=2), colour.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    threshold = _otsu(saturation)
    below = saturation <= threshold
    glass_like = below.any() and float(saturation[below].mean()) < GLASS_SATURATION and \
        float(high[below].mean()) > GLASS_VALUE
    tissue = saturation > max(threshold if glass_like else 0.0, MIN_SATURATION)
    hue = _hue(colour, high, low)
    ink = (high < INK_VALUE) | ((saturation > INK_SATURATION) & (hue >= INK_HUES[0])
                                & (hue < INK_HUES[1]))
    tissue &= ~ink
    area = um_per_pixel * um_per_pixel
    tissue = remove_small_components(tissue, math.ceil(MIN_TISSUE_UM2 / area))
    return fill_holes(tissue, math.ceil(MAX_HOLE_UM2 / area))


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins): the one that maximises the
    between-class variance; values <= threshold form the lower class."""
    counts = np.bincount(np.clip((values * 255).astype(np.int64), 0, 255).ravel(),
                         minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight = np.cumsum(counts)                     # pixels in the lower class, per threshold
    mass = np.cumsum(counts * levels)
    total, total_mass = weight[-1], mass[-1]
    upper = total - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight - total * mass) ** 2 / (weight * upper)
    between[~np.isfinite(between)] = -1.0
    return (int(np.argmax(between)) + 0.5) / 255.0


def _hue(colour: np.ndarray, high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB floats (h, w, 3), 0 where the pixel is grey."""
    red, green, blue = colour[..., 0], colour[..., 1], colour[..., 2]
    spread = np.maximum(high - low, 1e-6)
    hue = np.where(high == red, (green - blue) / spread % 6,
                   np.where(high == green, (blue - red) / spread + 2, (red - green) / spread + 4))
    return np.where(high - low > 0, hue * 60.0, 0.0)


# ---- connected components over runs of pixels ----------------------------------------------


@dataclass
class _Runs:
    """Runs of True per row of a bool mask (row, [start, end)), with an 8-connected
    component per run (0..n-1), component sizes and whether a component touches the
    mask's border."""

    rows: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    component: np.ndarray
    sizes: np.ndarray
    on_border: np.ndarray


def _runs(mask: np.ndarray) -> _Runs:
    height, width = mask.shape
    padded = np.zeros((height, width + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past its end
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # the same runs, in the same (row-major) order
    count = len(rows)
    # run a (row r) touches run b (row r + 1), diagonals too, iff a.start <= b.end and
    # a.end >= b.start; keys keep each search within row r
    stride = width + 3
    start_keys, end_keys = rows * stride + starts, rows * stride + ends
    below = rows > 0
    b = np.nonzero(below)[0]
    first = np.searchsorted(end_keys, (rows[b] - 1) * stride + starts[b], side="left")
    last = np.searchsorted(start_keys, (rows[b] - 1) * stride + ends[b], side="right")
    touching = np.maximum(last - first, 0)
    pair_b = np.repeat(b, touching)
    offsets = np.arange(int(touching.sum())) - np.repeat(np.cumsum(touching) - touching,
                                                         touching)
    pair_a = np.repeat(first, touching) + offsets
    labels = np.arange(count)
    while True:  # minimum label along every edge, then pointer jumping, until stable
        smaller = np.minimum(labels[pair_a], labels[pair_b])
        updated = labels.copy()
        np.minimum.at(updated, pair_a, smaller)
        np.minimum.at(updated, pair_b, smaller)
        updated = updated[updated]
        if np.array_equal(updated, labels):
            break
        labels = updated
    _, component = np.unique(labels, return_inverse=True)
    component = component.reshape(-1)
    sizes = np.bincount(component, weights=ends - starts, minlength=component.max(initial=-1) + 1)
    edge = (rows == 0) | (rows == height - 1) | (starts == 0) | (ends == width)
    on_border = np.bincount(component, weights=edge, minlength=len(sizes)) > 0
    return _Runs(rows, starts, ends, component, sizes.astype(np.int64), on_border)


def _paint(runs: _Runs, chosen: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask of `shape` that is True on the runs whose component is `chosen`."""
    height, width = shape
    pick = chosen[runs.component]
    marks = np.zeros((height, width + 1), np.int32)
    np.add.at(marks, (runs.rows[pick], runs.starts[pick]), 1)
    np.add.at(marks, (runs.rows[pick], runs.ends[pick]), -1)
    return np.cumsum(marks, axis=1)[:, :width] > 0


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """`mask` without its 8-connected components of fewer than `min_pixels` pixels."""
    runs = _runs(mask)
    return _paint(runs, runs.sizes >= min_pixels, mask.shape)


def fill_holes(mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """`mask` with its holes of fewer than `max_pixels` pixels filled: components of the
    background (8-connected) that do not touch the border."""
    runs = _runs(~mask)
    holes = (runs.sizes < max_pixels) & ~runs.on_border
    return mask | _paint(runs, holes, mask.shape)


# ---- masks from files, and previews --------------------------------------------------------


def read_tissue_mask(path: str | Path, slide: SlideImage) -> TissueMask:
    """A mask image (any size, any format `open_image` reads; non-zero = tissue) covering
    the whole of `slide`. Masks larger than MAX_DETECTION_SIDE are reduced by blocks: a
    block is tissue where any of its pixels is (label values 1, 2... survive).

    Raises:
        ImageReadError (a ValueError): the file cannot be read, selects no tissue, or its
            aspect is not the slide's (a mask of part of the slide, or of another slide).
    """
    path = Path(path)
    if path.suffix.lower() in GEOJSON_SUFFIXES:
        return _polygon_mask(path, slide)
    with open_image(path) as image:
        mask_w, mask_h = image.dimensions
        slide_w, slide_h = slide.dimensions
        # the slide scaled and rounded to whole pixels, or within 1 %
        tolerance = max(2 * max(slide_w, slide_h), 0.01 * mask_w * slide_h)
        if abs(mask_w * slide_h - mask_h * slide_w) > tolerance:
            raise ImageReadError(path, f"a {mask_w} x {mask_h} mask does not cover the slide "
                                 f"{slide.path.name} ({slide_w} x {slide_h}): the aspect "
                                 f"ratios differ ({mask_w / mask_h:.3f} vs "
                                 f"{slide_w / slide_h:.3f}); export it for the whole slide")
        mask = _read_any(image, math.ceil(max(mask_w, mask_h) / MAX_DETECTION_SIDE))
    if not mask.any():
        raise ImageReadError(path, "the mask selects no tissue (every pixel is zero)")
    return TissueMask(mask, (slide_w / mask.shape[1], slide_h / mask.shape[0]), str(path))


def _polygon_mask(path: Path, slide: SlideImage) -> TissueMask:
    """QuPath's annotations (GeoJSON polygons in level-0 pixels) rasterised over the slide
    at MAX_DETECTION_SIDE pixels on its longer side (or level 0's, if smaller)."""
    from sstream.io.geojson import rasterise, read_polygons  # scikit-image: only if used

    slide_w, slide_h = slide.dimensions
    factor = max(1.0, max(slide_w, slide_h) / MAX_DETECTION_SIDE)
    shape = (max(1, round(slide_h / factor)), max(1, round(slide_w / factor)))
    scale = (slide_w / shape[1], slide_h / shape[0])
    mask = rasterise(read_polygons(path), shape, scale)
    if not mask.any():
        raise ImageReadError(path, f"no polygon covers a pixel of the slide "
                             f"{slide.path.name} ({slide_w} x {slide_h}): are the "
                             "coordinates level-0 pixels of this slide?")
    return TissueMask(mask, scale, str(path))


def _read_any(image: SlideImage, factor: int) -> np.ndarray:
    """Level 0 of `image` as a bool mask, non-zero pixels True, reduced by `factor` x
    `factor` blocks (True where any pixel is), read in bands of whole blocks."""
    width, height = image.dimensions
    out = np.zeros((-(-height // factor), -(-width // factor)), bool)
    band = factor * max(1, (1 << 22) // (factor * width))
    for y0 in range(0, height, band):
        rows = min(band, height - y0)
        pixels = image.read_region((0, y0), 0, (width, rows), fill=0).any(axis=2)
        padded = np.zeros((-(-rows // factor) * factor, out.shape[1] * factor), bool)
        padded[:rows, :width] = pixels
        blocks = padded.reshape(-1, factor, out.shape[1], factor).any(axis=(1, 3))
        out[y0 // factor:y0 // factor + blocks.shape[0]] = blocks
    return out


def tissue_preview(slide: SlideImage, tissue: TissueMask, max_side: int = 1024):
    """A PIL image of the slide (longer side `max_side` at most) with what is not tissue
    dimmed and the tissue's outline in green, and a caption line with the tissue share."""
    from PIL import Image, ImageDraw

    width, height = slide.dimensions
    factor = max(1.0, max(width, height) / max_side)
    shape = (max(1, round(height / factor)), max(1, round(width / factor)))
    rgb = read_downsampled(slide, 0, shape).astype(np.float32)
    ys = (np.arange(shape[0]) + 0.5) * height / shape[0]
    xs = (np.arange(shape[1]) + 0.5) * width / shape[1]
    inside = tissue.sample(xs[None, :], ys[:, None])
    rgb[~inside] = 0.35 * rgb[~inside] + 0.65 * np.array([70, 80, 110], np.float32)
    outline = inside & ~_eroded(inside)
    rgb[outline] = (40, 220, 60)
    caption = 20
    canvas = Image.new("RGB", (shape[1], shape[0] + caption), "white")
    canvas.paste(Image.fromarray(rgb.astype(np.uint8)), (0, caption))
    ImageDraw.Draw(canvas).text(
        (4, 4), f"{slide.path.name}: tissue {tissue.fraction:.1%} of the slide "
                f"({tissue.source})", fill="black")
    return canvas


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` whose 4 neighbours are all in it (the border counts as outside)."""
    padded = np.pad(mask, 1)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])
