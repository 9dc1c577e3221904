"""Decoding a slide's JPEG tiles on the GPU (nvJPEG, through torchvision).

A GPU that trains on a slide can also decode it: `torchvision.io.decode_jpeg(files,
device="cuda")` decodes a batch of JPEG files with nvJPEG and leaves the pixels on the GPU, so
neither the CPU's decoders nor the bus (uint8 instead of floats, or nothing at all) stand in
the way. `JpegRegionReader` reads a region of a level whose tiles are baseline YCbCr JPEG (the
usual whole-slide TIFF: Aperio SVS, the pyramids sstream writes) as a uint8 (h, w, 3) tensor
on the device; levels of any other kind are read by the slide's own reader.

Why it is the default on CUDA: the CPU pool's threads share the interpreter with the thread
that drives the GPU, so on a fast GPU decoding in threads steals the launch thread's time
instead of hiding behind it, whereas nvJPEG leaves the CPU free (docs/reading.md has the
measurements). `sstream --jpeg-decoder cpu` (SSTREAM_JPEG_DECODER=cpu) turns it off.

Pixels differ from the CPU decoder's: JPEG leaves the inverse DCT's rounding and the chroma
upsampling to the decoder, so nvJPEG and libjpeg-turbo differ by under half a level on
average, up to a few tens at sharp colour edges (measured on synthetic slides), as two CPU
decoders can.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from sstream.errors import InputError
from sstream.io import SlideImage

__all__ = ["JPEG_DECODERS", "JpegRegionReader", "jpeg_decoder"]

JPEG_DECODERS = ("auto", "nvjpeg", "cpu")


def jpeg_decoder() -> str:
    """The JPEG decoder for slides read onto a GPU: SSTREAM_JPEG_DECODER (set by `sstream
    --jpeg-decoder`): "auto" (the default) and "nvjpeg" decode JPEG-tiled levels with nvJPEG
    when the model runs on CUDA, "cpu" always with the CPU pool."""
    choice = os.environ.get("SSTREAM_JPEG_DECODER", "auto").strip().lower() or "auto"
    if choice not in JPEG_DECODERS:
        raise InputError(f"SSTREAM_JPEG_DECODER must be one of {', '.join(JPEG_DECODERS)}, "
                         f"got {choice!r}")
    return choice


class JpegRegionReader:
    """Regions of one slide level decoded by torchvision's `decode_jpeg` on `device`.

    Call with (y0, y1, x0, x1) in pixels of `level` (the region may cross the level's
    border: the outside reads as `fill`); returns a uint8 (h, w, 3) tensor on `device`.
    `JpegRegionReader.supports(slide, level)` says whether the level is JPEG tiles.
    """

    def __init__(self, slide: SlideImage, level: int, device: torch.device | str,
                 fill: int = 255) -> None:
        self.slide, self.level, self.device, self.fill = slide, level, torch.device(device), fill
        self.width, self.height = slide.level_dimensions[level]

    @staticmethod
    def supports(slide: SlideImage, level: int) -> bool:
        return slide.jpeg_tiles(level, (0, 1, 0, 1)) is not None

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        out = torch.full((y1 - y0, x1 - x0, 3), self.fill, dtype=torch.uint8,
                         device=self.device)
        iy0, iy1 = max(y0, 0), min(y1, self.height)
        ix0, ix1 = max(x0, 0), min(x1, self.width)
        if iy0 >= iy1 or ix0 >= ix1:
            return out
        tiles = self.slide.jpeg_tiles(self.level, (iy0, iy1, ix0, ix1))
        if tiles is None:
            raise InputError(f"{self.slide.path}: level {self.level} is not JPEG tiles")
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = 0  # sparse tiles read as black
        files = [(box, data) for box, data in tiles if data is not None]
        decoded = self._decode([data for _, data in files])
        for ((ty0, ty1, tx0, tx1), _), tile in zip(files, decoded):
            # the tile's part inside the region, in level pixels
            cy0, cy1, cx0, cx1 = max(ty0, iy0), min(ty1, iy1), max(tx0, ix0), min(tx1, ix1)
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = tile[
                :, cy0 - ty0:cy1 - ty0, cx0 - tx0:cx1 - tx0].permute(1, 2, 0)
        return out

    def _decode(self, files: list[bytes]) -> list[torch.Tensor]:
        """(3, tile h, tile w) uint8 tensors on the device, one per file, in one batch."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not files:
            return []
        data = [torch.from_numpy(np.frombuffer(f, dtype=np.uint8).copy()) for f in files]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as e:
            from sstream.io import ImageReadError

            raise ImageReadError(self.slide.path, f"nvJPEG cannot decode level {self.level}: "
                                                  f"{e}") from e
