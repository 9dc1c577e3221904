"""What both engines' runs (crop_run.py, halo_run.py) need from the image and the caller.

A `TileIO` reads input regions onto the stream's device, announces the regions a pass will
read to a source that decodes ahead, makes zeros for regions no wanted output needs, reports
progress tile by tile, and holds the autocast state of the forward for the backward's re-runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sstream.engine.saving import AutocastState
from sstream.engine.tiling import Box

TileProgress = Callable[[str, int, int], None]
"""Called as (phase, tiles done, tiles in all) after every tile; phase "forward"/"backward"."""


class TileIO:
    """One image's input regions as the tiles read them, and the progress of its passes.

    `source`: an ImageSource (streaming.py) of shape (N, C, H, W); `tiles` the tiles a pass
    runs unless told otherwise (the plan's), for progress.
    """

    def __init__(self, stream: nn.Module, source: Any, tiles: int,
                 on_tile: TileProgress | None) -> None:
        self.stream, self.source, self.tiles, self.on_tile = stream, source, tiles, on_tile
        self.device = module_device(stream)
        prefer_device = getattr(source, "prefer_device", None)
        if prefer_device is not None:  # a source that can hand regions out on our device
            prefer_device(self.device)
        self.autocast = AutocastState(self.device)  # backward re-runs use the forward's

    def expect(self, boxes: Iterable[Box]) -> None:
        """Tell the source which input regions come next, in order, if it wants to know
        (an `ImageSource` with `expect`, e.g. one that decodes ahead)."""
        announce = getattr(self.source, "expect", None)
        if announce is not None:
            announce(list(boxes))

    def read(self, box: Box) -> torch.Tensor:
        """An input region on the stream's device (pinned for an async host copy)."""
        crop = self.source.read(box)
        if crop.device != self.device:
            if self.device.type == "cuda" and crop.device.type == "cpu":
                crop = crop.pin_memory()
            crop = crop.to(self.device, non_blocking=True)
        return crop

    def blank(self, box: Box) -> torch.Tensor:
        """Zeros in place of an input region no wanted output depends on (never read)."""
        y0, y1, x0, x1 = box
        batch, channels = self.source.shape[:2]
        return torch.zeros((batch, channels, y1 - y0, x1 - x0), device=self.device,
                           dtype=module_dtype(self.stream))

    def report(self, phase: str, done: int, total: int | None = None) -> None:
        """Progress: `done` of `total` tiles (default: the plan's) of the pass `phase`."""
        if self.on_tile is not None:
            self.on_tile(phase, done, self.tiles if total is None else total)


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU if it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first parameter (the default dtype if it has none)."""
    for tensor in module.parameters():
        return tensor.dtype
    return torch.get_default_dtype()
