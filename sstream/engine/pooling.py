"""Global pooling of the stream's output, tile by tile, and its gradient, block by block.

When the head starts with global max or average pooling (every model zoo entry whose whole
trunk streams, the paper's CAMELYON17 setup), neither the feature map y (N, C', H', W') nor
its gradient need ever exist: the forward reduces each tile's output region as it comes, the
head runs on the pooled (N, C') vector, and the gradient the pooled values receive, g (N, C'),
gives y's gradient for any block of output positions without storing it. With a mask M
(H', W') or (N, H', W') only masked positions count (tissue, not glass):

    avg:  p[n, c] = sum_{M[n] at (i, j)} y[n, c, i, j] / |M[n]|
          dL/dy[n, c, i, j] = g[n, c] / |M[n]| where M[n, i, j], else 0
    max:  p[n, c] = y[n, c, i*, j*], (i*, j*) the first maximum over M[n] in row-major order
          dL/dy[n, c, i, j] = g[n, c] at (i*, j*), else 0

which is what `adaptive_max_pool2d` (with positions off the mask at -inf) and the masked
mean give under autograd: `adaptive_max_pool2d` sends the gradient to the *first* maximum
(ReLU zeros make ties common), so a tile's maximum replaces the running one when it is larger
or equal at an earlier flattened position, and ties across tiles resolve globally.

Backward (streaming.py): every output block whose gradient is zero is left out, so with max
pooling at most N x C' blocks are re-run. Each re-run recomputes its block from its own input
crop (the crop engine: the blocks partition the output, so parameter gradients add up
exactly, and nothing is kept between tiles), and the crop is its block plus the receptive
field's margin. With few, scattered maxima, small blocks cost less than the forward's tiles:
`sparse_plan` picks, per image, the block side (halving from the tile) that minimises the
input pixels re-run, with a fixed allowance per block for what a crop costs whatever its size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sstream.engine.attention import AttentionPooling
from sstream.engine.tiling import Box, OutputMask, Tile, TilePlan
from sstream.errors import InputError

POOLING_MODES = ("max", "avg")

# Per re-run crop, in input pixels of the stream, what a crop costs beyond its area (Python
# and per-layer dispatch; ResNet-18 and tiny on 2 CPU cores, see the module docstring).
CROP_ALLOWANCE_PIXELS = 64 * 64


def check_mode(mode: str) -> str:
    """`mode` if it is "max" or "avg", else a one-line ValueError."""
    if mode not in POOLING_MODES:
        raise InputError(f"mode must be 'max' or 'avg', got {mode!r}")
    return mode


def head_global_pool(head: nn.Module) -> str | None:
    """"max" or "avg" when `head` (an nn.Sequential) starts with global pooling (every
    model zoo head whose whole trunk streams), "attention" when it starts with
    `AttentionPooling`, else None: then the stream's output can be pooled tile by tile
    (`StreamingCNN.global_pool`, `attention_pool`) and the rest of the head applied to the
    pooled vector."""
    first = head[0] if isinstance(head, nn.Sequential) and len(head) else None
    if isinstance(first, AttentionPooling):
        return "attention"
    if isinstance(first, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)) and \
            first.output_size in (1, (1, 1)):
        return "max" if isinstance(first, nn.AdaptiveMaxPool2d) else "avg"
    return None


class GlobalPool:
    """The running global pooling of one image's stream output, fed region by region.

    `add(box, region)` takes a region (N, C', h, w) of the output at output box
    (y0, y1, x0, x1); regions must not overlap. Afterwards `values` (N, C') holds the pooled
    values and, for "max", `indices` (N, C') the flattened H' x W' positions of the maxima.
    """

    def __init__(self, mode: str, output_size: tuple[int, int],
                 mask: OutputMask | None = None) -> None:
        self.mode, self.output_size, self.mask = check_mode(mode), output_size, mask
        self._values: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None

    def add(self, box: Box, region: torch.Tensor) -> None:
        batch, channels, height, width = region.shape
        if height * width == 0:
            return
        self._dtype = region.dtype
        keep = None if self.mask is None else self.mask.block(box, region.device)
        flat = region.reshape(batch, channels, height * width)  # (N, C', h*w)
        keep_flat = None if keep is None else keep.reshape(keep.shape[0], 1, height * width)
        if self.mode == "avg":
            if keep_flat is not None:  # where, not a product: off-mask values may be anything
                flat = torch.where(keep_flat, flat, flat.new_zeros(()))
            tile_sum = flat.sum(dim=2, dtype=torch.float64)
            self._values = tile_sum if self._values is None else self._values + tile_sum
            return
        if keep_flat is not None:
            if not bool(keep_flat.any()):
                return
            flat = flat.masked_fill(~keep_flat, -torch.inf)
        tile_max, position = flat.max(dim=2)  # first maximum of the region, row-major
        y0, _, x0, _ = box
        index = (y0 + position // width) * self.output_size[1] + x0 + position % width
        if self._values is None or self.indices is None:
            self._values, self.indices = tile_max, index
            return
        better = (tile_max > self._values) | ((tile_max == self._values)
                                              & (index < self.indices))
        self._values = torch.where(better, tile_max, self._values)
        self.indices = torch.where(better, index, self.indices)

    @property
    def values(self) -> torch.Tensor:
        assert self._values is not None and self._dtype is not None, "no region was added"
        if self.mode == "max":
            return self._values
        return (self._values / self._counts(self._values.device)).to(self._dtype)

    def _counts(self, device: torch.device) -> torch.Tensor:
        """Positions each batch element averages over, shaped to divide (N, C')."""
        if self.mask is None:
            return torch.tensor(float(self.output_size[0] * self.output_size[1]),
                                dtype=torch.float64, device=device)
        return self.mask.counts.to(device=device, dtype=torch.float64)[:, None]

    def gradient(self, grad: torch.Tensor) -> BlockGradient:
        """The gradient of the stream's output, block by block, for pooled gradient `grad`."""
        return BlockGradient(self, grad)


class BlockGradient:
    """dL/dy for output blocks, from the pooled gradient (N, C') (module docstring).

    Calling it with a box gives that block's gradient (N, C', h, w), or None where it is
    zero, so the engine need not re-run the block. `positions()` lists the output positions
    (rows, columns) whose gradient is non-zero for max pooling, None for averaging (every
    masked position).
    """

    def __init__(self, pool: GlobalPool, grad: torch.Tensor) -> None:
        self.pool, self.grad = pool, grad
        self.mask, self.size = pool.mask, pool.output_size
        if pool.mode == "max":
            assert pool.indices is not None
            flowing = grad != 0  # a zero gradient re-runs nothing
            self.n, self.c = flowing.nonzero(as_tuple=True)
            index = pool.indices.to(grad.device)[self.n, self.c]
            self.rows, self.cols = index // self.size[1], index % self.size[1]
        else:
            self.scaled = (grad.double() / pool._counts(grad.device)).to(grad.dtype)

    def positions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rows, self.cols) if self.pool.mode == "max" else None

    def __call__(self, box: Box) -> torch.Tensor | None:
        y0, y1, x0, x1 = box
        if self.pool.mode == "avg":
            if self.mask is not None and not self.mask.any_in(box):
                return None
            block = self.scaled[:, :, None, None].expand(*self.scaled.shape, y1 - y0, x1 - x0)
            if self.mask is None:
                return block
            return block * self.mask.block(box, block.device).to(block.dtype)
        inside = (self.rows >= y0) & (self.rows < y1) & (self.cols >= x0) & (self.cols < x1)
        if not bool(inside.any()):
            return None
        n, c = self.n[inside], self.c[inside]
        block = self.grad.new_zeros((*self.grad.shape, y1 - y0, x1 - x0))
        block[n, c, self.rows[inside] - y0, self.cols[inside] - x0] = self.grad[n, c]
        return block


def sparse_plan(make_plan: Callable[[tuple[int, int]], TilePlan], tile: tuple[int, int],
                stride: tuple[int, int], positions: tuple[torch.Tensor, torch.Tensor],
                ) -> tuple[TilePlan, list[Tile]]:
    """The plan (and its tiles holding a position, raster order) that re-runs the output
    `positions` (rows, columns) at the least cost: block sides from the tile's down to one
    output, halving; cost = input pixels of every crop re-run + CROP_ALLOWANCE_PIXELS each.
    `make_plan(tile)` makes the plan for a tile side in input pixels."""
    rows, cols = (p.to("cpu") for p in positions)
    out_tile = [max(1, t // s) for t, s in zip(tile, stride)]
    best: tuple[float, TilePlan, list[Tile]] | None = None
    while True:
        plan = make_plan((out_tile[0] * stride[0], out_tile[1] * stride[1]))
        cells = torch.unique(torch.stack([rows // out_tile[0], cols // out_tile[1]]), dim=1)
        tiles = [plan.tile(int(r), int(c)) for r, c in cells.t().tolist()]
        cost = sum(_area(t.in_box) + CROP_ALLOWANCE_PIXELS for t in tiles)
        if best is None or cost < best[0]:
            best = (cost, plan, tiles)
        if max(out_tile) == 1:
            break
        out_tile = [max(1, t // 2) for t in out_tile]
    return best[1], sorted(best[2], key=lambda t: (t.row, t.col))




def _area(box: Box) -> int:
    y0, y1, x0, x1 = box
    return (y1 - y0) * (x1 - x0)
