"""Tissue in the jobs: which of the stream's outputs count, alike in train, predict, saliency.

A user chooses once (`--tissue auto|none|PATH`); `Tissue` carries the choice through every
job, and a checkpoint records it (`ModelConfig.tissue`), so that predict and saliency pool
over what training pooled over unless told otherwise:

- "auto": each slide's tissue is detected on a thumbnail (`sstream.io.tissue.detect_tissue`);
  where none is found (an image that is not a stained bright-field slide: grayscale,
  fluorescence, empty glass) the whole image counts: a default never refuses an image;
- "none": every output counts (no mask: images that are not slides, or all tissue);
- PATH: a mask image for one slide (predict and saliency of one slide); a CSV's `mask`
  column gives a slide its own mask file in train and predict alike, whatever the choice.

An output position counts where the centre of its receptive field falls on tissue: along an
axis, output j of a stream with stride S and window [j*S - lo, j*S + hi] reads input pixels
whose centre is at coordinate j*S + (hi - lo + 1) / 2 (pixel i spans [i, i + 1)); the image
source maps that point to the slide's level 0 (`PixelSource.level0`: crop window, level,
flips and rotations), where the slide's `TissueMask` is sampled. Pooling then runs over those
outputs only, and the engine never reads, computes or re-runs tiles that none of them needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstream.data import PixelSource
from sstream.engine import StreamingCNN
from sstream.errors import InputError
from sstream.io import SlideImage, atomic_output, open_image
from sstream.io.tissue import TissueMask, detect_tissue, read_tissue_mask, tissue_preview
from sstream.options import Options, option

__all__ = ["TISSUE_CHOICES", "Tissue", "TissueConfig", "TissuePreview", "output_mask",
           "pixel_mask", "preview_tissue", "write_preview"]

TISSUE_CHOICES = ("auto", "none")


@dataclass(frozen=True)
class Tissue:
    """The user's choice: "auto", "none", or a mask file (see the module docstring)."""

    choice: str = "auto"

    @classmethod
    def parse(cls, text: str | None, saved: str = "none") -> Tissue:
        """From `--tissue` as typed; None takes `saved` (a checkpoint's record). ValueError
        for anything that is neither a choice nor an existing file."""
        if text is None:
            return cls(saved)
        if text in TISSUE_CHOICES:
            return cls(text)
        path = Path(text)
        if not path.is_file():
            raise InputError(f"--tissue must be auto, none or a mask image file; {text!r} is "
                             "neither" + (" (a directory)" if path.is_dir() else " (no such "
                                                                                  "file)"))
        return cls(str(path))

    @property
    def is_file(self) -> bool:
        return self.choice not in TISSUE_CHOICES

    @property
    def record(self) -> str:
        """What a checkpoint keeps: "auto", or "none" (a mask file belongs to one slide)."""
        return "none" if self.is_file else self.choice

    def mask_for(self, slide: SlideImage, mask_file: Path | None = None) -> TissueMask | None:
        """The slide's tissue mask: its own file if it has one, else by the choice (None:
        every output counts, as where "auto" finds no tissue)."""
        if mask_file is not None:
            return read_tissue_mask(mask_file, slide)
        if self.choice == "none":
            return None
        if self.choice == "auto":
            found = detect_tissue(slide)
            return found if found.mask.any() else None
        return read_tissue_mask(self.choice, slide)


def output_mask(source: PixelSource, scnn: StreamingCNN) -> torch.Tensor | None:
    """Which outputs of `scnn` on `source` count (bool (H', W')), from the slide's tissue
    (`source.tissue`; None when there is none: every output counts, as where a detected
    mask misses every output). ValueError naming the mask file when no output falls on the
    tissue it marks."""
    if source.tissue is None:
        return None
    height, width = scnn.output_size(source.shape)
    centres = []
    for axis, count in ((0, height), (1, width)):
        window = scnn.geometry.axis(axis)
        centres.append(np.arange(count) * window.stride + (window.hi - window.lo + 1) / 2)
    ys, xs = source.level0(centres[0][:, None], centres[1][None, :])
    mask = np.broadcast_to(source.tissue.sample(xs, ys), (height, width))
    if not mask.any() and source.tissue.source == "auto":
        return None
    if not mask.any():
        raise InputError(f"no tissue under the image ({source.tissue.source} mask, "
                         f"{source.tissue.fraction:.1%} of the slide): check it with `sstream "
                         "tissue`, or use --tissue none")
    return torch.from_numpy(mask.copy())  # a writable array of its own (not a view)


def write_preview(slide: SlideImage, mask: TissueMask, out: Path, max_side: int = 1024,
                  overwrite: bool = True) -> None:
    """`tissue_preview` of the slide written as a PNG, atomically."""
    image = tissue_preview(slide, mask, max_side)
    with atomic_output(out, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG")


def pixel_mask(source: PixelSource, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """Whether each pixel (its centre) of the box (y0, y1, x0, x1) of `source` lies on the
    slide's tissue, bool (y1 - y0, x1 - x0); None where the source has no tissue mask."""
    if source.tissue is None:
        return None
    y0, y1, x0, x1 = box
    ys, xs = source.level0(np.arange(y0, y1)[:, None] + 0.5, np.arange(x0, x1)[None, :] + 0.5)
    return np.broadcast_to(source.tissue.sample(xs, ys), (y1 - y0, x1 - x0))


@dataclass
class TissueConfig(Options):
    """The options of `sstream tissue` (`preview_tissue`): which mask, what is written."""

    out: str | None = option(None, "Preview PNG: the slide with glass dimmed and the tissue "
                             "outlined.", shown="<slide>.tissue.png")
    tissue: str = option("auto", "auto (detect) or a mask image to check against the slide.")
    mask: str | None = option(None, "Also write the mask as a PNG (255 = tissue) to edit and "
                              "pass back as --tissue PATH.")
    max_side: int = option(1024, "Longer side of the preview (px).")
    overwrite: bool = option(False, "Replace existing outputs.")

    def validate(self) -> None:
        """InputError for a preview that cannot be made (the mask file is checked on use)."""
        if self.max_side < 16:
            raise InputError("--max-side must be at least 16")
        if self.tissue == "none":
            raise InputError("--tissue none has no mask to preview: use auto or a mask file")


@dataclass
class TissuePreview:
    """What `preview_tissue` found and wrote."""

    slide: Path
    fraction: float          # share of the slide that is tissue
    source: str              # "auto" or the mask file
    preview: Path
    mask: Path | None        # the mask image written, if asked for
    mask_size: tuple[int, int]  # (width, height) of the mask


def preview_tissue(slide_path: str | Path, config: TissueConfig | None = None,
                   **options: Any) -> TissuePreview:
    """The `sstream tissue` job: the slide with its tissue mask drawn over it (PNG, longer
    side `max_side`, at `out`, by default beside the slide as <slide>.tissue.png), and
    optionally the mask itself (`mask`: a PNG, 255 = tissue, at the detection resolution:
    edit it and pass it back as --tissue PATH). Written atomically. Options come as a
    `TissueConfig`, by name (`preview_tissue(slide, max_side=512)`), or both.

    A slide where "auto" finds no tissue gets its preview too (fraction 0: it shows why;
    the jobs then use the whole image).

    Raises:
        InputError: `tissue` "none" (nothing to preview) or not a file, `max_side` below 16;
            unreadable slide or mask (ImageReadError). FileExistsError: an output exists.
    """
    config = TissueConfig.given(config, options)
    config.validate()
    tissue = Tissue.parse(config.tissue)
    beside = Path(slide_path).with_name(Path(slide_path).name + ".tissue.png")
    outputs = [Path(config.out) if config.out is not None else beside]
    outputs += [Path(config.mask)] if config.mask is not None else []
    for path in outputs:
        if path.exists() and not config.overwrite:
            raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")
    with open_image(slide_path) as slide:
        mask = read_tissue_mask(tissue.choice, slide) if tissue.is_file else detect_tissue(slide)
        write_preview(slide, mask, outputs[0], config.max_side, config.overwrite)
    from PIL import Image

    if config.mask is not None:
        with atomic_output(outputs[1], overwrite=config.overwrite) as tmp:
            Image.fromarray(mask.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    return TissuePreview(Path(slide_path), mask.fraction, mask.source, outputs[0],
                         outputs[1] if config.mask is not None else None,
                         (mask.mask.shape[1], mask.mask.shape[0]))
