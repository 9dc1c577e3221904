"""Synthetic H&E-like slides whose label is visible only at full resolution.

Each slide is a tiled, JPEG-compressed pyramidal TIFF rendered tile by tile (never a full
array of the slide) from pure functions of the pixel coordinates and the seed:

- glass (near white) and tissue: tissue where a sum of random low-frequency sinusoids is
  above a threshold (about 70% of the slide, or the `tissue_fraction` asked for); tissue is
  pink (eosin) modulated by a mid-frequency field and noise;
- nuclei: small purple discs (radius 2-4.5 px) on a jittered 16 px grid, from an integer hash
  of (seed, cell), so a tile never needs its neighbours;
- blobs of radius 8-12 px (diameter 16-24 px), 3 or more per slide, in two kinds with the
  same mean colour (115, 115, 172), centred on tissue (as lesions are):
  *lesions* are a checkerboard of 2 x 2 px navy (30, 30, 110) and pale (200, 200, 235)
  squares; *decoys* are flat discs of the mean colour.

Label 1 slides have 1-3 lesions among their blobs, label 0 slides only decoys, with the same
blob count distribution. For a regression target, `contrast=c` in [0, 1] scales the
lesions' checkerboard around the decoy colour (0: flat, a decoy; 1: navy and pale): a
continuous score, which a 4x4 mean erases as it erases the lesions.

The checkerboard has a 4 px period: a 4 x 4 (or coarser) mean, as in a 4-8x downsampled
pyramid level, turns a lesion into exactly the decoy colour, so the label cannot be learned
from a downsampled image but a small CNN at full resolution sees a high-contrast texture
that nothing else in the slide has.

Deterministic: the same arguments give the same pixels (and the same file bytes).
Command line: `sstream make-sample-data OUT --count 32 --size 768 --seed 0`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sstream.errors import InputError
from sstream.io.atomic import atomic_output
from sstream.io.writer import TiffMapWriter

__all__ = ["Blob", "make_sample_data", "render_tile", "write_synthetic_slide"]

GLASS = np.array([242, 240, 244], np.float32)
EOSIN = np.array([228, 156, 190], np.float32)
NUCLEUS = np.array([105, 48, 138], np.float32)
BLOB_MEAN = np.array([115, 115, 172], np.float32)
LESION_DARK = np.array([30, 30, 110], np.float32)
LESION_LIGHT = np.array([200, 200, 235], np.float32)
NUCLEUS_CELL = 16  # px


@dataclass(frozen=True)
class Blob:
    """A lesion or decoy: centre (x, y) and radius in level-0 pixels."""

    x: float
    y: float
    radius: float
    lesion: bool


@dataclass(frozen=True)
class _Slide:
    width: int
    height: int
    seed: int
    waves: np.ndarray  # (k, 4): fx, fy, phase, amplitude of the tissue field
    blobs: tuple[Blob, ...]
    offset: float = 0.8  # tissue cover (field + offset) * 3: half at 1/6, full from 1/3
    contrast: float = 1.0  # lesions' checkerboard around the decoy colour


def _field(waves: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The tissue field: a sum of low-frequency sinusoids at level-0 points (x, y)."""
    field = np.zeros(np.broadcast_shapes(np.shape(xs), np.shape(ys)))
    for fx, fy, phase, amp in waves:
        field = field + amp * np.sin(2 * np.pi * (fx * xs + fy * ys) + phase)
    return field


def _tissue(field: np.ndarray, offset: float) -> np.ndarray:
    """Tissue cover in [0, 1] from the field: a soft glass/tissue edge."""
    return np.clip((field + offset) * 3, 0, 1)


def _plan_slide(width: int, height: int, label: int, seed: int,
                tissue_fraction: float | None = None, contrast: float = 1.0) -> _Slide:
    rng = np.random.default_rng([seed, 1])
    k = 6
    period = rng.uniform(0.4, 1.2, k) * max(width, height)
    angle = rng.uniform(0, 2 * np.pi, k)
    waves = np.stack(
        [
            np.cos(angle) / period,
            np.sin(angle) / period,
            rng.uniform(0, 2 * np.pi, k),
            rng.uniform(0.5, 1.0, k),
        ],
        axis=1,
    )
    offset = 0.8
    if tissue_fraction is not None:  # the field's quantile on a coarse grid
        ys, xs = np.mgrid[0:height:max(1, height // 256), 0:width:max(1, width // 256)]
        offset = 1 / 6 - float(np.quantile(_field(waves, xs, ys), 1 - tissue_fraction))
    area_units = width * height / 768**2
    n_blobs = int(rng.integers(3, 6)) + int(round(4 * max(area_units - 1, 0)))
    n_lesions = min(int(rng.integers(1, 4)) if label else 0, n_blobs)
    kinds = np.zeros(n_blobs, bool)
    kinds[rng.choice(n_blobs, n_lesions, replace=False)] = True
    margin = 24
    blobs = []
    for lesion in kinds:
        for _ in range(200):  # a centre on full tissue (the last draw if none is found)
            x = float(rng.uniform(margin, max(width - margin, margin + 1)))
            y = float(rng.uniform(margin, max(height - margin, margin + 1)))
            if _tissue(_field(waves, x, y), offset) >= 1:
                break
        blobs.append(Blob(x=x, y=y, radius=float(rng.uniform(8, 12)), lesion=bool(lesion)))
    return _Slide(width, height, seed, waves, tuple(blobs), offset, contrast)


def _hash01(seed: int, a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) floats from integer coordinates (splitmix64-style mixing)."""
    with np.errstate(over="ignore"):
        h = (
            a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            ^ b.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            ^ np.uint64((seed * 0x165667B1 + salt * 0x27D4EB2F) & 0xFFFFFFFFFFFFFFFF)
        )
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def render_tile(slide: _Slide, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the slide at level-0 pixels [y0, y0 + h) x [x0, x0 + w)."""
    ys = np.arange(y0, y0 + h, dtype=np.float64)[:, None]  # (h, 1)
    xs = np.arange(x0, x0 + w, dtype=np.float64)[None, :]  # (1, w)
    field = np.broadcast_to(_field(slide.waves, xs, ys), (h, w))
    tissue = _tissue(field, slide.offset)[..., None]  # soft tissue/glass edge (h, w, 1)
    texture = np.sin(xs / 23.0 + np.sin(ys / 37.0) * 2) * np.cos(ys / 29.0 - xs / 61.0)
    yi, xi = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    noise = _hash01(slide.seed, yi, xi, salt=7) - 0.5  # per pixel, (h, w)
    img = EOSIN * (1 + 0.06 * texture[..., None] + 0.05 * noise[..., None])
    img = tissue * img + (1 - tissue) * GLASS  # (h, w, 3)

    # nuclei: one candidate per 16 px cell, evaluated against the pixel's own cell only
    cy, cx = yi // NUCLEUS_CELL, xi // NUCLEUS_CELL
    present = _hash01(slide.seed, cy, cx, salt=1) < 0.4
    radius = 2.0 + 2.5 * _hash01(slide.seed, cy, cx, salt=2)
    ncx = cx * NUCLEUS_CELL + 5 + 6 * _hash01(slide.seed, cy, cx, salt=3)
    ncy = cy * NUCLEUS_CELL + 5 + 6 * _hash01(slide.seed, cy, cx, salt=4)
    dist = np.hypot(xi + 0.5 - ncx, yi + 0.5 - ncy)
    cover = np.clip(radius - dist + 0.5, 0, 1) * present * tissue[..., 0]
    shade = 0.85 + 0.3 * _hash01(slide.seed, cy, cx, salt=5)
    img = img * (1 - cover[..., None]) + (NUCLEUS * shade[..., None]) * cover[..., None]

    for blob in slide.blobs:  # few per slide; skip those outside this tile
        if (
            blob.x + blob.radius + 1 < x0
            or blob.x - blob.radius - 1 > x0 + w
            or blob.y + blob.radius + 1 < y0
            or blob.y - blob.radius - 1 > y0 + h
        ):
            continue
        cover = np.clip(blob.radius - np.hypot(xi + 0.5 - blob.x, yi + 0.5 - blob.y) + 0.5, 0, 1)
        if blob.lesion:
            checker = ((xi // 2 + yi // 2) % 2 == 0)[..., None]
            paint = BLOB_MEAN + slide.contrast * (
                np.where(checker, LESION_DARK, LESION_LIGHT) - BLOB_MEAN)
        else:
            paint = np.broadcast_to(BLOB_MEAN, img.shape)
        img = img * (1 - cover[..., None]) + paint * cover[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_synthetic_slide(
    path: str | os.PathLike,
    size: int | tuple[int, int],
    label: int,
    seed: int,
    tile: int = 256,
    mpp: float = 0.5,
    quality: int = 90,
    overwrite: bool = False,
    tissue_fraction: float | None = None,
    contrast: float = 1.0,
) -> tuple[Blob, ...]:
    """Write one synthetic slide as a tiled JPEG pyramidal BigTIFF; return its blobs.

    Args:
        path: output .tif (written atomically).
        size: width = height in pixels, or (width, height).
        label: 1 = contains lesions, 0 = decoys only.
        seed: determines every pixel.
        tile: tile size (multiple of 16); also the height of the rendered bands.
        mpp: microns per pixel stored in the file.
        quality: JPEG quality.
        overwrite: replace an existing file.
        tissue_fraction: the share of the slide that is tissue, in (0, 1]; None: about 70%.
        contrast: the lesions' texture contrast in [0, 1] (a score to regress; 1: the
            classification data's lesions).

    Raises:
        FileExistsError: `path` exists and not `overwrite`.
        ValueError: label not 0/1, non-positive size, tissue fraction outside (0, 1].
    """
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if label not in (0, 1):
        raise InputError(f"label must be 0 or 1, got {label}")
    if width <= 0 or height <= 0:
        raise InputError(f"size must be positive, got {size}")
    if tissue_fraction is not None and not 0 < tissue_fraction <= 1:
        raise InputError(f"tissue_fraction must be in (0, 1], got {tissue_fraction}")
    if not 0 <= contrast <= 1:
        raise InputError(f"contrast must be in [0, 1], got {contrast}")
    slide = _plan_slide(width, height, int(label), int(seed), tissue_fraction, contrast)
    with TiffMapWriter(
        path,
        shape=(height, width, 3),
        dtype=np.uint8,
        tile_size=tile,
        mpp=mpp,
        description=f"sstream synthetic slide label={label} seed={seed}",
        compression="jpeg",
        compression_level=quality,
        overwrite=overwrite,
    ) as writer:
        for y0 in range(0, height, tile):  # one band = one row of tiles
            h = min(tile, height - y0)
            band = np.concatenate(
                [
                    render_tile(slide, x0, y0, min(tile, width - x0), h)
                    for x0 in range(0, width, tile)
                ],
                axis=1,
            )
            writer.write_band(y0, band)
    return slide.blobs


def make_sample_data(
    out_dir: str | os.PathLike,
    count: int = 32,
    size: int | tuple[int, int] = 768,
    seed: int = 0,
    val_fraction: float = 0.25,
    tile: int = 256,
    overwrite: bool = False,
    on_slide: Callable[[int, int], None] | None = None,
    regression: bool = False,
    patients: int | None = None,
) -> tuple[Path, Path]:
    """Write `count` synthetic slides to `out_dir/images/` plus train.csv and val.csv.

    With `patients` P, slide i belongs to patient `case_<i mod P>`, whose slides share the
    label (patient p's class is p mod 2; for regression one contrast per patient), every
    CSV has a `patient` column, the validation set is the last round(P * val_fraction)
    patients' slides, and `cohort.csv` lists every slide (the input of `sstream split`).

    Labels alternate 0, 1 (balanced), or with `regression` every slide has lesions and its
    label is their texture contrast, drawn uniformly from [0, 1] (2 decimals); the last
    `round(count * val_fraction)` slides form the validation set. CSVs have the header
    `image,label` and paths relative to the CSV.

    Args:
        out_dir: created if missing.
        count: number of slides (>= 2).
        size: side in pixels, or (min, max): each slide's side is then drawn from the
            multiples of 64 in that range.
        seed: base seed; slide i uses seed * 100003 + i.
        val_fraction: share of slides in val.csv.
        tile: tile size of the TIFFs.
        overwrite: replace existing files.
        on_slide: called as (slides written, count) after each slide (progress).

    Returns:
        (train_csv, val_csv) paths.
    """
    if count < 2:
        raise InputError(f"count must be >= 2, got {count}")
    if patients is not None and not 2 <= patients <= count:
        raise InputError(f"patients must be in 2..count ({count}), got {patients}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    n_val = int(round(count * val_fraction))
    rows = []
    patient_contrast = [round(float(c), 2) for c in
                        np.random.default_rng([seed, 3]).uniform(0, 1, patients or 0)]
    for i in range(count):
        if isinstance(size, int):
            side = size
        else:
            lo, hi = math.ceil(size[0] / 64), size[1] // 64
            side = 64 * int(rng.integers(lo, hi + 1))
        contrast = round(float(rng.uniform(0, 1)), 2) if regression else 1.0
        label = contrast if regression else i % 2
        if patients is not None:
            contrast = patient_contrast[i % patients] if regression else 1.0
            label = contrast if regression else (i % patients) % 2
        name = f"images/slide_{i:03d}.tif"
        write_synthetic_slide(
            out / name, side, 1 if regression else label, seed * 100003 + i, tile=tile,
            overwrite=overwrite, contrast=contrast,
        )
        rows.append((name, label) if patients is None else (name, label,
                                                             f"case_{i % patients:03d}"))
        if on_slide is not None:
            on_slide(i + 1, count)
    train_csv, val_csv = out / "train.csv", out / "val.csv"
    if patients is not None:
        held = int(round(patients * val_fraction))
        val_patients = {f"case_{p:03d}" for p in range(patients - held, patients)}
        _write_csv(out / "cohort.csv", rows, overwrite)
        _write_csv(train_csv, [r for r in rows if r[2] not in val_patients], overwrite)
        _write_csv(val_csv, [r for r in rows if r[2] in val_patients], overwrite)
        return train_csv, val_csv
    for csv_path, subset in ((train_csv, rows[: count - n_val]), (val_csv, rows[count - n_val :])):
        _write_csv(csv_path, subset, overwrite)
    return train_csv, val_csv


def _write_csv(path: Path, rows, overwrite: bool) -> None:
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "patient"][:len(rows[0]) if rows else 2])
        writer.writerows(rows)
