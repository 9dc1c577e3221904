"""Tile plans: which input crop computes which block of the stream's output, exactly.

Coordinates: `in_*` are stream-input pixels, `out_*` are output (feature-map) pixels, and
`keep_*` are pixels of one crop's output. Boxes are half-open (y0, y1, x0, x1).

Per axis, output tile [j0, j1) is computed from the input crop [c0, c1) with (docs/design.md)

    c0 = max(0, floor((j0*S - lo) / S) * S)     aligned to the output stride S, so every
                                                layer's sampling grid matches the whole image
    c1 = min(H, (j1 - 1)*S + max(hi, reach) + 1)   then widened so that (c1 - c0) = H (mod S)

(c0 is moved left when the tile's outputs see only right padding, so the crop is never empty)
and the crop's outputs [j0 - c0/S, j1 - c0/S) are kept (`reach` makes sure they exist even
where padding exceeds a kernel). Zeros padded at an interior crop edge
reach only outputs outside the kept range; at a true image border the crop's border is the
image's. Widening c1 to H's residue mod S makes every layer's size arithmetic on the crop (odd
sizes, ceil_mode pooling, branches that must agree in size) behave as on the whole image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sstream.engine.geometry import AxisWindow, StreamGeometry
from sstream.errors import InputError

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class AxisSpan:
    """One tile along one axis: output [out0, out1) from input crop [in0, in1)."""

    out0: int
    out1: int
    in0: int
    in1: int

    def keep(self, stride: int) -> tuple[int, int]:
        """The kept range in the crop's own output coordinates."""
        return self.out0 - self.in0 // stride, self.out1 - self.in0 // stride


def axis_spans(in_len: int, out_len: int, window: AxisWindow, out_tile: int,
               min_len: int = 1) -> list[AxisSpan]:
    """Split one axis of the output into tiles of `out_tile` pixels (the last may be shorter).

    `min_len` is the shortest input the stream accepts along this axis: a crop that ends at
    the image border but whose outputs there see only padding can need more input than its
    window for every layer to have a valid size, so such crops start earlier."""
    stride = window.stride
    spans = []
    for out0 in range(0, out_len, out_tile):
        out1 = min(out_len, out0 + out_tile)
        in0 = max(0, ((out0 * stride - window.lo) // stride) * stride)
        in1 = min(in_len, (out1 - 1) * stride + max(window.hi, window.reach) + 1)
        in1 = min(in_len, in1 + (in_len - in1) % stride)
        in0 = min(in0, ((in1 - 1) // stride) * stride)  # outputs that only see right padding
        if in1 - in0 < min_len:
            in0 = max(0, ((in1 - min_len) // stride) * stride)
        spans.append(AxisSpan(out0, out1, in0, in1))
    return spans


@dataclass(frozen=True)
class Tile:
    """One tile: the input crop to run and where its kept output goes."""

    row: int
    col: int
    in_box: Box
    out_box: Box
    keep_box: Box


@dataclass(frozen=True)
class TilePlan:
    """All tiles for one input size, in raster order (rows of tiles top to bottom).

    `input_size` and `output_size` are (height, width); `tile_size` is the tile side in input
    pixels (a multiple of the output stride).
    """

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    tile_size: tuple[int, int]
    rows: tuple[AxisSpan, ...]
    cols: tuple[AxisSpan, ...]
    stride: tuple[int, int]

    def __iter__(self) -> Iterator[Tile]:
        for row in range(len(self.rows)):
            for col in range(len(self.cols)):
                yield self.tile(row, col)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tile(self, row: int, col: int) -> Tile:
        ys, xs = self.rows[row], self.cols[col]
        (ky0, ky1), (kx0, kx1) = ys.keep(self.stride[0]), xs.keep(self.stride[1])
        return Tile(row, col, in_box=(ys.in0, ys.in1, xs.in0, xs.in1),
                    out_box=(ys.out0, ys.out1, xs.out0, xs.out1), keep_box=(ky0, ky1, kx0, kx1))

    @property
    def largest_crop(self) -> tuple[int, int]:
        """The largest input crop (height, width) any tile runs."""
        return (max(s.in1 - s.in0 for s in self.rows), max(s.in1 - s.in0 for s in self.cols))


def make_plan(geometry: StreamGeometry, input_size: tuple[int, int],
              output_size: tuple[int, int], tile_size: tuple[int, int],
              min_size: tuple[int, int] = (1, 1)) -> TilePlan:
    """The tile plan for an input of `input_size` whose stream output is `output_size`;
    `min_size` is the smallest (height, width) the stream accepts."""
    out_tiles = [max(1, t // s) for t, s in zip(tile_size, geometry.stride)]
    rows = axis_spans(input_size[0], output_size[0], geometry.axis(0), out_tiles[0],
                      min_size[0])
    cols = axis_spans(input_size[1], output_size[1], geometry.axis(1), out_tiles[1],
                      min_size[1])
    return TilePlan(input_size, output_size, tile_size, tuple(rows), tuple(cols), geometry.stride)


class OutputMask:
    """Which positions of the stream's output count (True), for pooling restricted to tissue.

    `mask` is a bool tensor (H', W') or (N, H', W') at the stream's output resolution; a 2-D
    mask holds for every batch element. Boxes are output pixels. `any_in(box)` answers in
    constant time from a summed-area table of the union over the batch, so the engines can ask
    it for every tile (and the halo engine for every node of every tile) of a gigapixel slide.
    """

    def __init__(self, mask: torch.Tensor, output_size: tuple[int, int], batch: int) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InputError("mask must be a bool tensor (H', W') or (N, H', W') at the "
                             "stream's output resolution")
        shape = tuple(mask.shape)
        if shape not in (tuple(output_size), (batch, *output_size)):
            raise InputError(f"mask shape {shape} does not match the stream's output: expected "
                             f"{tuple(output_size)} or {(batch, *output_size)}")
        self.mask = mask.detach().cpu()
        self.per_image = self.mask.dim() == 3
        counts = self.mask.flatten(-2).sum(-1).reshape(-1)  # (1,) or (N,)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            which = "the mask" if not self.per_image else \
                f"the mask of batch element{'s' if len(empty) > 1 else ''} {empty}"
            raise InputError(f"{which} selects no output position: nothing to pool")
        self.counts = counts
        union = self.mask.any(0) if self.per_image else self.mask
        table = torch.zeros((union.shape[0] + 1, union.shape[1] + 1), dtype=torch.int64)
        table[1:, 1:] = union.to(torch.int64).cumsum(0).cumsum(1)
        self._table = table

    @property
    def size(self) -> tuple[int, int]:
        return int(self.mask.shape[-2]), int(self.mask.shape[-1])

    def count_in(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Masked positions (union over the batch) in every box rows[i] x cols[j]: `rows`
        (R, 2) and `cols` (C, 2) are half-open ranges, clipped to the output here; (R, C)."""
        height, width = self.size
        y0, y1 = rows[:, 0].clamp(0, height), rows[:, 1].clamp(0, height)
        x0, x1 = cols[:, 0].clamp(0, width), cols[:, 1].clamp(0, width)
        y1, x1 = torch.maximum(y0, y1), torch.maximum(x0, x1)
        t = self._table
        return (t[y1][:, x1] - t[y0][:, x1] - t[y1][:, x0] + t[y0][:, x0])

    def any_in(self, box: Box) -> bool:
        """Whether the box (y0, y1, x0, x1) holds a masked position of any batch element."""
        y0, y1, x0, x1 = box
        rows, cols = torch.tensor([[y0, y1]]), torch.tensor([[x0, x1]])
        return bool(self.count_in(rows, cols)[0, 0] > 0)

    def block(self, box: Box, device: torch.device) -> torch.Tensor:
        """The mask over the box as (N or 1, 1, h, w), to broadcast against a block."""
        y0, y1, x0, x1 = box
        part = self.mask[..., y0:y1, x0:x1]
        part = part.unsqueeze(1) if self.per_image else part[None, None]
        return part.to(device)


def masked_tiles(plan: TilePlan, mask: OutputMask | None) -> list[Tile]:
    """The plan's tiles whose output block holds a masked position (all without a mask)."""
    if mask is None:
        return list(plan)
    return [tile for tile in plan if mask.any_in(tile.out_box)]
