"""The crop engine's run: every tile's input crop, margins included, through the stream alone.

Each tile of the plan (tiling.py) reads its input crop, wide enough for the whole receptive
field of its output block, runs it through the stream and keeps that block: the forward copies
it into the feature map (or hands it to a pooling consumer); the backward re-runs the crop with
autograd and back-propagates the block's share of the feature-map gradient. Every output
position belongs to exactly one tile, so the parameter gradients summed over tiles equal the
whole image's. The crops' input gradients overlap; `_InputGradBlocks` adds them up block by
block and hands each block out as soon as no later tile can touch it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from sstream.engine.saving import GradientSum
from sstream.engine.tile_io import TileIO, module_dtype
from sstream.engine.tiling import Box, OutputMask, Tile, TilePlan, masked_tiles

OutputGradient = Callable[[Box], "torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None"]
"""The gradient of the stream's output block (y0, y1, x0, x1) (output pixels), or None where
it is zero, or a function of the block's output giving it (attention pooling's gradient
depends on the features: the re-run's output is used, so the block is computed once)."""

GradientWriter = Callable[[Box, torch.Tensor], None]
"""Receives final blocks of the input gradient: (input box (y0, y1, x0, x1), gradient)."""


class CropRun:
    """One image through the crop engine: forward (no grad) and backward (re-run per tile)."""

    def __init__(self, stream: nn.Module, plan: TilePlan, io: TileIO) -> None:
        self.stream, self.plan, self.io = stream, plan, io

    def forward(self) -> torch.Tensor:
        """The stream's whole output (N, C', H', W'), assembled from `output_regions()`."""
        fmap: torch.Tensor | None = None
        for (oy0, oy1, ox0, ox1), kept in self.output_regions():
            if fmap is None:
                batch, channels = kept.shape[:2]
                fmap = kept.new_empty((batch, channels, *self.plan.output_size))
            fmap[..., oy0:oy1, ox0:ox1] = kept
        assert fmap is not None, "a tile plan always has at least one tile"
        return fmap

    def output_regions(self, mask: OutputMask | None = None
                       ) -> Iterator[tuple[Box, torch.Tensor]]:
        """(output box, the stream's output there) without grad, in raster order; the boxes
        partition the output. With `mask`, tiles that no masked output depends on are
        skipped (neither read nor computed). Progress is reported once the consumer has
        taken a tile."""
        self.io.expect(tile.in_box for tile in masked_tiles(self.plan, mask))
        for done, tile in enumerate(self.plan, start=1):
            if mask is None or mask.any_in(tile.out_box):
                with torch.no_grad():
                    kept = self.kept(tile, self.stream(self.io.read(tile.in_box)))
                yield tile.out_box, kept
            self.io.report("forward", done)

    def kept(self, tile: Tile, crop_out: torch.Tensor) -> torch.Tensor:
        """The tile's output block: the kept part of its crop's output."""
        ky0, ky1, kx0, kx1 = tile.keep_box
        if crop_out.shape[-2] < ky1 or crop_out.shape[-1] < kx1:
            raise RuntimeError(
                f"internal error: crop {tile.in_box} gave output {tuple(crop_out.shape[-2:])}, "
                f"too small for kept range {tile.keep_box}; please report this stream")
        return crop_out[..., ky0:ky1, kx0:kx1]

    def backward(self, grad_fmap: torch.Tensor | OutputGradient, params: list[torch.Tensor],
                 write: GradientWriter | None, plan: TilePlan | None = None,
                 tiles: Sequence[Tile] | None = None) -> list[torch.Tensor | None]:
        """Every tile of `plan` (default: the forward's) whose output gradient is not zero
        re-runs its crop with autograd. `tiles` (raster order) restricts it to those tiles
        when no input gradient is wanted: the others' output gradient must be zero. The input
        gradient goes to `write` in final blocks, in raster order, if given. Returns the
        parameter gradients summed over tiles."""
        plan = plan or self.plan
        grad_of = grad_fmap if callable(grad_fmap) else _block_of(grad_fmap)
        blocks = None
        if write is not None:
            assert tiles is None, "input-gradient blocks are released tile by tile, in order"
            blocks = _InputGradBlocks(plan, self.io.source.shape, self.io.device,
                                      module_dtype(self.stream), write)
        if tiles is not None or not callable(grad_fmap):  # else which tiles run is unknown
            self.io.expect(tile.in_box for tile in (plan if tiles is None else tiles))
        tiles = list(plan) if tiles is None else tiles
        param_grads = GradientSum(params)
        with param_grads.collecting():  # parameter gradients summed as they come
            for done, tile in enumerate(tiles, start=1):
                grad_kept = grad_of(tile.out_box)
                if grad_kept is not None:  # else the tile adds nothing to any gradient
                    crop = self.io.read(tile.in_box).detach().requires_grad_(blocks is not None)
                    with torch.enable_grad(), self.io.autocast():
                        kept = self.kept(tile, self.stream(crop))
                    if callable(grad_kept):
                        grad_kept = grad_kept(kept.detach())
                    inputs = ([crop] if blocks is not None else []) + params
                    grads = torch.autograd.grad(kept, inputs, grad_kept.to(kept.dtype),
                                                allow_unused=True)
                    if blocks is not None:
                        blocks.add(tile.in_box, grads[0])
                    del crop, kept, grads  # before the next tile's re-run allocates
                if blocks is not None:
                    blocks.release(tile.row, tile.col)
                self.io.report("backward", done, len(tiles))
        return param_grads.sums


def _block_of(tensor: torch.Tensor) -> OutputGradient:
    """An OutputGradient reading blocks of a whole gradient tensor (N, C', H', W')."""
    def block(box: Box) -> torch.Tensor:
        y0, y1, x0, x1 = box
        return tensor[..., y0:y1, x0:x1]
    return block


class _InputGradBlocks:
    """Adds up the crops' overlapping input gradients and hands out each block once final.

    Blocks cut the image at the crops' first rows and columns (suffix minima, so the cuts
    never decrease): block (r, c) is final after tile (r, c), because later tiles of the row
    start right of it and later rows start below it. Pending sums are kept per block column,
    from the current block row down to the lowest row a crop reached: memory is about the
    overlap times the width plus one tile, never a full-width band of tile rows.
    """

    def __init__(self, plan: TilePlan, shape: Sequence[int], device: torch.device,
                 dtype: torch.dtype, deliver: Callable[[Box, torch.Tensor], None]) -> None:
        self.batch, self.channels = int(shape[0]), int(shape[1])
        self.dtype = dtype  # of blocks no tile sent a gradient to; else the gradients' own
        self.row_cuts = _cuts([span.in0 for span in plan.rows], plan.input_size[0])
        self.col_cuts = _cuts([span.in0 for span in plan.cols], plan.input_size[1])
        self.device, self.deliver = device, deliver
        # block column -> (first pending row, sums for rows [first, first + height) or None)
        self.pending: list[tuple[int, torch.Tensor | None]] = [(0, None)] * (
            len(self.col_cuts) - 1)

    def add(self, in_box: Box, grad: torch.Tensor) -> None:
        y0, y1, x0, x1 = in_box
        for col in range(len(self.pending)):
            cx0, cx1 = self.col_cuts[col], self.col_cuts[col + 1]
            lo, hi = max(x0, cx0), min(x1, cx1)
            if lo < hi:
                self.dtype = grad.dtype
                first, sums = self._grown(col, y1)
                sums[..., y0 - first:y1 - first, lo - cx0:hi - cx0] += grad[..., lo - x0:hi - x0]

    def _grown(self, col: int, y1: int) -> tuple[int, torch.Tensor]:
        """Column `col`'s pending sums, grown with zeros to reach row y1."""
        first, sums = self.pending[col]
        held = 0 if sums is None else sums.shape[-2]
        if sums is None or first + held < y1:
            width = self.col_cuts[col + 1] - self.col_cuts[col]
            grown = torch.zeros((self.batch, self.channels, y1 - first, width),
                                dtype=self.dtype, device=self.device)
            if sums is not None:
                grown[..., :held, :] = sums
            sums = grown
            self.pending[col] = (first, sums)
        return first, sums

    def release(self, row: int, col: int) -> None:
        """Hand out block (row, col): no tile after tile (row, col) reaches it."""
        by0, by1 = self.row_cuts[row], self.row_cuts[row + 1]
        bx0, bx1 = self.col_cuts[col], self.col_cuts[col + 1]
        if by1 == by0 or bx1 == bx0:
            return
        first, sums = self._grown(col, by1)
        assert first == by0, "blocks are released in raster order"
        self.deliver((by0, by1, bx0, bx1), sums[..., :by1 - by0, :])
        self.pending[col] = (by1, sums[..., by1 - by0:, :].clone())  # frees the rows handed out


def _cuts(starts: Sequence[int], length: int) -> list[int]:
    """Block edges from tile starts: suffix minima of the starts (0 first), then `length`."""
    cuts = list(starts) + [length]
    for k in range(len(starts) - 1, -1, -1):
        cuts[k] = min(cuts[k], cuts[k + 1])
    cuts[0] = 0
    return cuts
