"""Stain colour: HED jitter (augmentation) and Macenko or Reinhard normalisation, each a
fixed per-pixel function of a pixel's RGB.

A streamed step stays exact only if every tile sees the same transform of the same pixel.
So every parameter is drawn or fitted once per image, never per tile:

- `HedJitter` (Tellez et al. 2018, "Whole-slide mitosis detection in H&E breast histology
  using PHH3 as a reference to train distilled stain-invariant convolutional networks"):
  RGB -> optical density (OD = -ln I) -> haematoxylin, eosin, DAB by Ruifrok and Johnston's
  colour deconvolution (the matrix scikit-image's rgb2hed uses); each stain scaled by
  alpha ~ U(1 - s, 1 + s) and shifted by beta ~ U(-s, s), drawn once per image; back to RGB.
- `Macenko` (Macenko et al. 2009): the slide's two stain vectors in OD space are the
  extreme angles (1st and 99th percentile) of its tissue pixels' OD projected on the plane
  of their two largest principal directions; a pixel's stain concentrations (least squares
  on those vectors) are scaled so their 99th percentiles match the reference's and recoloured
  with the reference stain vectors (the values of Macenko's reference implementation).
- `Reinhard` (Reinhard et al. 2001): each pixel in Ruderman's l-alpha-beta space is shifted
  and scaled so the slide's tissue mean and standard deviation per channel become the
  reference's (here those of the Macenko reference stains, so both methods aim at the same
  H&E).

Normalisers are fitted on the slide's thumbnail (`fit_normaliser`, at most THUMBNAIL_SIDE
pixels a side); its tissue is the pixels whose optical density exceeds OD_TISSUE in every
channel (Macenko's own rule: glass is transparent).

Why not torchstain: its normalisers fit the source stains on whatever image they are given,
so tile-by-tile use would fit every tile anew (not exact), and its wheel installs a
top-level `tests` package that shadows this project's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sstream.errors import InputError
from sstream.io import SlideImage, read_downsampled

STAIN_NORMALISERS = ("macenko", "reinhard")
THUMBNAIL_SIDE = 1024
OD_TISSUE = 0.15            # optical density above which a pixel holds stain (Macenko)
_FLOOR = 1.0 / 255.0        # darkest intensity considered (keeps the OD finite)

# Ruifrok & Johnston: rows are the OD colours of haematoxylin, eosin and DAB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# Macenko's reference H&E: OD stain vectors (columns H, E) and 99th-percentile concentrations.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONCENTRATIONS = np.array([1.9705, 1.0308])
# Ruderman et al.: RGB -> LMS, and log10 LMS -> l-alpha-beta.
LMS_FROM_RGB = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782],
                         [0.0241, 0.1288, 0.8444]])
LAB_FROM_LOG_LMS = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]])


def _channels_last(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.movedim(1, -1)  # (1, 3, h, w) -> (1, h, w, 3)


def _matrix(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def optical_density(pixels: torch.Tensor) -> torch.Tensor:
    """-ln(I) of intensities in [0, 1] (floored at 1/255)."""
    return -torch.log(pixels.clamp(min=_FLOOR))


class PixelTransform:
    """A per-pixel colour transform of (1, 3, h, w) pixels / 255, values kept in [0, 1]."""

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        rgb = _channels_last(pixels)
        return self.transform_rgb(rgb).clamp(0.0, 1.0).movedim(-1, 1)

    def transform_rgb(self, rgb: torch.Tensor) -> torch.Tensor:  # (..., 3) -> (..., 3)
        raise NotImplementedError


@dataclass(frozen=True)
class HedJitter(PixelTransform):
    """Scale (`alphas`) and shift (`betas`) each of the H, E and D stain channels."""

    alphas: tuple[float, float, float] = (1.0, 1.0, 1.0)
    betas: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def draw(cls, generator: np.random.Generator, strength: float = 0.05) -> HedJitter:
        """alpha ~ U(1 - strength, 1 + strength), beta ~ U(-strength, strength) per stain."""
        alphas = generator.uniform(1 - strength, 1 + strength, 3)
        betas = generator.uniform(-strength, strength, 3)
        return cls(tuple(map(float, alphas)), tuple(map(float, betas)))  # type: ignore[arg-type]

    def transform_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        stains = optical_density(rgb) @ _matrix(HED_FROM_RGB, rgb)        # (..., 3) H, E, D
        stains = stains * _matrix(np.array(self.alphas), rgb) + _matrix(np.array(self.betas),
                                                                           rgb)
        return torch.exp(-(stains @ _matrix(RGB_FROM_HED, rgb)))


@dataclass(frozen=True)
class Macenko(PixelTransform):
    """A slide's stain vectors (3, 2: OD colours of H and E) and its 99th-percentile
    concentrations, mapped onto the reference's."""

    stains: tuple[tuple[float, float], ...]
    max_concentrations: tuple[float, float]

    @classmethod
    def fit(cls, rgb: np.ndarray, alpha: float = 1.0) -> Macenko:
        """Fit on uint8 (h, w, 3) pixels (a thumbnail). ValueError without tissue."""
        od = _tissue_od(rgb)
        _, vectors = np.linalg.eigh(np.cov(od.T))
        plane = vectors[:, 1:3]                                    # two largest directions
        projected = od @ plane
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        low, high = np.percentile(angles, [alpha, 100 - alpha])
        first = plane @ np.array([np.cos(low), np.sin(low)])
        second = plane @ np.array([np.cos(high), np.sin(high)])
        stains = np.stack([first, second], 1) if first[0] > second[0] else \
            np.stack([second, first], 1)                           # haematoxylin first
        stains *= np.sign(stains.sum(0))                           # positive OD colours
        concentrations = np.linalg.lstsq(stains, od.T, rcond=None)[0]
        maxima = np.percentile(concentrations, 99, axis=1)
        return cls(tuple(map(tuple, stains.tolist())), tuple(maxima.tolist()))

    def transform_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        unmix = np.linalg.pinv(np.array(self.stains))             # (2, 3)
        scale = REFERENCE_MAX_CONCENTRATIONS / np.array(self.max_concentrations)
        # OD -> concentrations -> scaled -> reference OD: one (3, 3) matrix
        recolour = (REFERENCE_STAINS @ np.diag(scale) @ unmix).T
        return torch.exp(-(optical_density(rgb) @ _matrix(recolour, rgb)))


def _lab(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB in [0, 1] -> Ruderman's l-alpha-beta."""
    rgb = torch.as_tensor(rgb)
    lms = (rgb @ _matrix(LMS_FROM_RGB.T, rgb)).clamp(min=_FLOOR)
    return torch.log10(lms) @ _matrix(LAB_FROM_LOG_LMS.T, rgb)


def _reference_lab_statistics() -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of l-alpha-beta over the Macenko reference stains at
    concentrations on a grid from 0 to their 99th percentiles."""
    grid = np.stack(np.meshgrid(*(np.linspace(0, m, 32) for m in
                                  REFERENCE_MAX_CONCENTRATIONS)), -1).reshape(-1, 2)
    rgb = np.exp(-(grid @ REFERENCE_STAINS.T))
    lab = _lab(torch.as_tensor(rgb)).numpy()
    return lab.mean(0), lab.std(0)


@dataclass(frozen=True)
class Reinhard(PixelTransform):
    """A slide's l-alpha-beta mean and standard deviation, mapped onto the reference's."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def fit(cls, rgb: np.ndarray) -> Reinhard:
        """Fit on uint8 (h, w, 3) pixels (a thumbnail)'s tissue. ValueError without tissue."""
        tissue = np.exp(-_tissue_od(rgb))
        lab = _lab(torch.as_tensor(tissue)).numpy()
        std = np.where(lab.std(0) > 0, lab.std(0), 1.0)
        return cls(tuple(lab.mean(0).tolist()), tuple(std.tolist()))

    def transform_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        target_mean, target_std = _reference_lab_statistics()
        gain = target_std / np.array(self.std)
        lab = _lab(rgb)
        lab = (lab - _matrix(np.array(self.mean), rgb)) * _matrix(gain, rgb) + \
            _matrix(target_mean, rgb)
        log_lms = lab @ _matrix(np.linalg.inv(LAB_FROM_LOG_LMS).T, rgb)
        return (10.0 ** log_lms) @ _matrix(np.linalg.inv(LMS_FROM_RGB).T, rgb)


def _tissue_od(rgb: np.ndarray) -> np.ndarray:
    """(n, 3) optical densities of the stained pixels of uint8 RGB (module docstring)."""
    od = -np.log(np.maximum(rgb.reshape(-1, 3).astype(np.float64) / 255.0, _FLOOR))
    tissue = od[(od > OD_TISSUE).all(1)]
    if len(tissue) < 16:
        raise InputError("no stained tissue to fit the stain normaliser on (fewer than 16 "
                         f"pixels with optical density above {OD_TISSUE})")
    return tissue


_FITTED: dict[tuple, PixelTransform] = {}  # (file, its mtime, level, method) -> fitted


def fit_normaliser(method: str, slide: SlideImage, level: int = 0) -> PixelTransform:
    """`method` ("macenko" or "reinhard") fitted on the slide's thumbnail (module
    docstring), once per file and level in this process (training opens each slide every
    epoch). ValueError for another method or a slide without stained tissue."""
    if method not in STAIN_NORMALISERS:
        raise InputError(f"--stain-normalize must be one of {', '.join(STAIN_NORMALISERS)}, "
                         f"got {method!r}")
    path = Path(slide.path)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0, level, method)
    if key not in _FITTED:
        _FITTED[key] = _fit(method, slide, level)
    return _FITTED[key]


def _fit(method: str, slide: SlideImage, level: int) -> PixelTransform:
    width, height = slide.level_dimensions[level]
    shrink = max(1.0, max(width, height) / THUMBNAIL_SIDE)
    shape = (max(1, round(height / shrink)), max(1, round(width / shrink)))
    thumbnail = read_downsampled(slide, level, shape) if shrink > 1 else \
        slide.read_region((0, 0), level, (width, height))
    try:
        return Macenko.fit(thumbnail) if method == "macenko" else Reinhard.fit(thumbnail)
    except ValueError as exc:
        raise InputError(f"{slide.path}: {exc}") from None


def chain(*transforms: PixelTransform | None) -> PixelTransform | None:
    """The transforms applied in order (None ones left out); None when there are none."""
    present = [t for t in transforms if t is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else _Chain(tuple(present))


@dataclass(frozen=True)
class _Chain(PixelTransform):
    transforms: tuple[PixelTransform, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            pixels = transform(pixels)
        return pixels


def slide_normaliser(method: str | None, read) -> PixelTransform | None:  # noqa: ANN001
    """The normaliser a model trained with `method` applies to a slide being read (a
    `sstream.reading.SlideRead`), or None. Predict and saliency use it as training did;
    a saliency map is then the gradient with respect to the normalised pixels."""
    if method is None:
        return None
    return fit_normaliser(method, read.slide, read.resolution.level)
