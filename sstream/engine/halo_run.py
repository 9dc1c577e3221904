"""The halo engine's run: one image through a HaloProgram (halo_schedule.py), forward and back.

Tiles run in raster order. Each node's *block* for a tile is its region (the schedule's) plus
the halo above (rows kept from the previous tile row, a full-width line buffer `up` rows high)
and to the left (`left` columns kept from the previous tile), assembled as

    block = [ top_in           ]     rows [A[r] - up, A[r+1]), columns [B[c] - left, B[c+1])
            [ left_in | region ]

and a window node computes its region from its input's block. A plain `nn.Conv2d` reads
exactly the input its region needs, the zeros beyond the image's border supplied by its own
padding (`_padded_span`).

Backward (the autograd Function in streaming.py): tiles in reverse raster order. Each tile's
blocks are rebuilt with autograd from its own input pixels and the halos saved in the forward
(`top_in`, `left_in`: thin strips), and one `autograd.grad` call back-propagates the tile's
part of the feature-map gradient together with the gradients that later tiles (to the right,
below; already done) sent to the halo strips this tile handed on (`left_out`, `next_top`); the
gradients reaching `top_in` / `left_in` go to the tiles that produced them, which come next.
So the stream's forward runs twice (no-grad pass, re-run) and its backward once, on each
output exactly once (plus, for pooling layers, ceil(p/s) outputs per interior tile edge).
During the re-run, cheap per-pixel values (BatchNorm, activations, sums) are saved as recipes
and recomputed in the backward (saving.py), so a layer keeps its convolution output only;
convolutions that read the image (which the tile keeps anyway) are recomputed too. Both only
where a tile's values are large enough, against the feature map, to be worth the time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from sstream.engine.geometry import fetch_attr
from sstream.engine.halo_schedule import HaloNode, HaloProgram, TileNeeds, run_node
from sstream.engine.saving import AutocastState, GradientSum, Recipes
from sstream.engine.tile_io import TileIO
from sstream.engine.tiling import Box, OutputMask


def _narrow2(tensor: torch.Tensor, dims: tuple[int, int], y0: int, y1: int, x0: int,
             x1: int) -> torch.Tensor:
    """Rows [y0, y1) and columns [x0, x1) of `tensor`, a view. Without autograd one
    as_strided call (half the time of two narrows: ~2700 views per ResNet-18 predict at 1024
    px, tile 256); with it two narrows, whose backward is cheaper than as_strided's."""
    hdim, wdim = dims
    if (y0, y1, x0, x1) == (0, tensor.shape[hdim], 0, tensor.shape[wdim]):
        return tensor
    if not torch.is_grad_enabled():
        shape, stride = list(tensor.shape), tensor.stride()
        shape[hdim], shape[wdim] = y1 - y0, x1 - x0
        return tensor.as_strided(shape, stride, tensor.storage_offset() + y0 * stride[hdim]
                                 + x0 * stride[wdim])
    if (y0, y1) != (0, tensor.shape[hdim]):
        tensor = tensor.narrow(hdim, y0, y1 - y0)
    if (x0, x1) != (0, tensor.shape[wdim]):
        tensor = tensor.narrow(wdim, x0, x1 - x0)
    return tensor


@dataclass
class _Block:
    """A node's block for the current tile: rows [y0, y1) x columns [x0, x1) of its output."""

    tensor: torch.Tensor
    y0: int
    x0: int

    def part(self, dims: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return _narrow2(self.tensor, dims, y0 - self.y0, y1 - self.y0, x0 - self.x0,
                        x1 - self.x0)


class HaloRun:
    """One image through a HaloProgram: forward (keeping halos if `keep`) and backward."""

    def __init__(self, program: HaloProgram, stream: nn.Module, io: TileIO, keep: bool
                 ) -> None:
        self.program, self.stream, self.io, self.keep = program, stream, io, keep
        self.saved_top: list[dict[fx.Node, torch.Tensor]] = []   # per tile row
        self.saved_left: dict[tuple[int, int, fx.Node], torch.Tensor] = {}

    # -- one tile --------------------------------------------------------------------------

    def _tile(self, row: int, col: int, top: dict[fx.Node, torch.Tensor],
              left: dict[fx.Node, torch.Tensor], visit: Callable[[HaloNode, _Block], None],
              input_region: torch.Tensor | None = None,
              recipes: Recipes | None = None) -> torch.Tensor:
        """Compute every node's region and block for tile (row, col).

        `top[v]`: v's rows [A[row] - up, A[row]) for the full width; `left[v]`: v's rows
        [A[row], A[row+1]) x columns [B[col] - left, B[col]). `visit(entry, block)` sees the
        block of every node with a halo as soon as it exists. Returns the output region.
        """
        env: dict[fx.Node, Any] = {}
        out_region = None
        for i, entry in enumerate(self.program.nodes):
            node = entry.node
            if entry.kind == "output":
                break
            if entry.kind == "constant":
                env[node] = run_node(node, self.stream, env)
                continue
            y0, y1 = entry.rows[row], entry.rows[row + 1]
            x0, x1 = entry.cols[col], entry.cols[col + 1]
            notes = recipes if entry.recompute else None  # where its values are noted
            if entry.kind == "input":
                region = input_region if input_region is not None else self.io.read(
                    (y0, y1, x0, x1))
            elif entry.kind == "window":
                region = self._window(entry, env, row, col, notes)
            elif entry.derived:
                yb, xb = max(0, y0 - entry.up), max(0, x0 - entry.left)
                env[node] = _Block(self._pointwise(entry, env, (yb, y1, xb, x1), notes),
                                   yb, xb)
                region = env[node].part(entry.dims, y0, y1, x0, x1)
            else:
                region = self._pointwise(entry, env, (y0, y1, x0, x1), notes)
            if entry is self.program.result:
                out_region = region
            if not entry.derived:
                env[node] = self._block(entry, region, row, col, top, left, notes)
            if entry.stores_halo:
                visit(entry, env[node])
            for done in self.program.release_after[i]:
                env.pop(done, None)
        assert out_region is not None
        return out_region

    def _pointwise(self, entry: HaloNode, env: dict[fx.Node, Any], box: Box,
                   notes: Recipes | None) -> Any:
        """A per-pixel node over `box`, noted in `notes` as recomputable if given."""
        assert entry.call is not None
        args, kwargs = self._operands(entry, env, box)
        value = entry.call(args, kwargs, as_written=not torch.is_grad_enabled())
        if notes is not None:
            notes.note(value, entry.call, args, kwargs)
        return value

    def _operands(self, entry: HaloNode, env: dict[fx.Node, Any], box: Box) -> tuple[Any, Any]:
        """(args, kwargs) of a per-pixel node: spatial operands cut to the node's region."""
        def operand(node: fx.Node) -> Any:
            value = env[node]
            if isinstance(value, _Block):
                return value.part(self.program.by_fx[node].dims, *box)
            return value

        return (fx.node.map_arg(entry.node.args, operand),
                fx.node.map_arg(entry.node.kwargs, operand))

    def _window(self, entry: HaloNode, env: dict[fx.Node, Any], row: int, col: int,
                notes: Recipes | None) -> torch.Tensor:
        """A window node's region, noted in `notes` as recomputable from its input if given."""
        src = self.program.by_fx[entry.sources[0]]
        block: _Block = env[src.node]
        y0, y1 = entry.rows[row], entry.rows[row + 1]
        x0, x1 = entry.cols[col], entry.cols[col + 1]
        assert entry.module is not None
        if y1 == y0 or x1 == x0:
            return self._empty(entry, block.tensor, y1 - y0, x1 - x0)
        if entry.exact_input:
            crop, call = _exact_conv(entry, block, src, (y0, y1, x0, x1))
        else:
            (_, sy, _), (_, sx, _) = entry.axes
            in_y0, in_x0 = entry.input_start(0, y0), entry.input_start(1, x0)
            crop = block.part(src.dims, in_y0, src.rows[row + 1], in_x0, src.cols[col + 1])
            call = functools.partial(_cropped_window, entry.module, (
                y0 - in_y0 // sy, y1 - in_y0 // sy, x0 - in_x0 // sx, x1 - in_x0 // sx))
        region = call((crop,), {})
        if notes is not None:
            notes.note(region, call, (crop,), {}, hold=False)
        return region

    def _empty(self, entry: HaloNode, like: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """An empty region of the dtype the module gives (autocast may change it)."""
        key = (entry.node, like.dtype, AutocastState(like.device))
        dtypes = self.program.empty_dtypes
        if key not in dtypes:
            (ey, _, _), (ex, _, _) = entry.axes
            probe = like.new_zeros((*like.shape[:2], ey, ex))
            with torch.no_grad():
                dtypes[key] = entry.module(probe).dtype  # type: ignore[misc]
        channels = _module_channels(entry.module, like.shape[1])
        return like.new_empty((like.shape[0], channels, height, width), dtype=dtypes[key])

    def _block(self, entry: HaloNode, region: torch.Tensor, row: int, col: int,
               top: dict[fx.Node, torch.Tensor], left: dict[fx.Node, torch.Tensor],
               notes: Recipes | None) -> _Block:
        """The region with the halo strips kept from the tiles above and to the left (noted in
        `notes` as recomputable if given, as the region is)."""
        y0, x0 = entry.rows[row], entry.cols[col]
        if not entry.stores_halo:
            return _Block(region, y0, x0)
        hdim, wdim = entry.dims
        yb, xb = max(0, y0 - entry.up), max(0, x0 - entry.left)
        x1 = entry.cols[col + 1]
        strip = above = None
        if xb < x0:  # zeros where no tile to the left ran (`regions` with needs)
            strip = left.get(entry.node)
            if strip is None:
                strip = region.new_zeros(_with_size(region.shape, entry.dims,
                                                    (region.shape[hdim], x0 - xb)))
        if yb < y0:
            line = top.get(entry.node)
            above = region.new_zeros(_with_size(region.shape, entry.dims, (y0 - yb, x1 - xb))) \
                if line is None else line.narrow(wdim, xb, x1 - xb)
        if not torch.is_grad_enabled():
            return _Block(_joined(above, strip, region, entry.dims), yb, xb)

        def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
            joined = torch.cat(parts, dim=dim)
            if notes is not None:
                notes.note(joined, _cat, (parts,), {"dim": dim}, hold=False)
            return joined

        middle = region
        if strip is not None:
            if strip.requires_grad:
                strip = _OwnGradient.apply(strip)
            middle = cat([strip, region], wdim)
        return _Block(middle if above is None else cat([above, middle], hdim), yb, xb)

    # -- forward ---------------------------------------------------------------------------

    def forward(self) -> torch.Tensor:
        """The stream's whole output, without grad, assembled from `regions()`."""
        result = self.program.result
        fmap: torch.Tensor | None = None
        with torch.no_grad():
            for (oy0, oy1, ox0, ox1), out in self.regions():
                if fmap is None:
                    fmap = out.new_empty(_with_size(out.shape, result.dims, result.size))
                _narrow2(fmap, result.dims, oy0, oy1, ox0, ox1).copy_(out)
        assert fmap is not None
        return fmap

    def output_regions(self, mask: OutputMask | None = None
                       ) -> Iterator[tuple[Box, torch.Tensor]]:
        """`regions()` without grad; with `mask`, only the tiles its outputs need run
        (`HaloProgram.tiles_needed`)."""
        needs = None if mask is None else self.program.tiles_needed(mask)
        with torch.no_grad():
            yield from self.regions(needs)

    def regions(self, needs: TileNeeds | None = None) -> Iterator[tuple[Box, torch.Tensor]]:
        """(output box, output region) tile by tile in raster order; the regions partition the
        stream's output (some are empty: deep layers wait for gathered regions). With `needs`
        (`HaloProgram.tiles_needed`), tiles that need not run only hand on the halo strips
        they were given, yield nothing and read nothing, and tiles that need not read run on
        zeros instead. Progress is reported once the consumer has taken a tile.
        """
        rows, cols = self.program.grid
        top: dict[fx.Node, torch.Tensor] = {}
        result = self.program.result
        done = 0
        self.io.expect(self.program.input_boxes(needs))
        for row in range(rows):
            if self.keep:
                self.saved_top.append(top)
            next_top: dict[fx.Node, torch.Tensor] = {}
            left: dict[fx.Node, torch.Tensor] = {}
            for col in range(cols):
                def hand_on(entry: HaloNode, block: _Block, row: int = row, col: int = col,
                            left: dict = left, next_top: dict = next_top) -> None:
                    self._hand_on(entry, block, row, col, left, next_top)
                    if self.keep and entry.left and col + 1 < cols:
                        self.saved_left[row, col + 1, entry.node] = left[entry.node]

                if needs is None or needs.runs[row, col]:
                    box = self._input_box(row, col)
                    zeros = None if needs is None or needs.reads[row, col] \
                        else self.io.blank(box)
                    out = self._tile(row, col, top, left, hand_on, input_region=zeros)
                    yield (result.rows[row], result.rows[row + 1], result.cols[col],
                           result.cols[col + 1]), out
                else:
                    self._pass_through(row, col, top, left, hand_on)
                done += 1
                self.io.report("forward", done)
            top = next_top

    def _input_box(self, row: int, col: int) -> Box:
        entry = next(e for e in self.program.nodes if e.kind == "input")
        return (entry.rows[row], entry.rows[row + 1], entry.cols[col], entry.cols[col + 1])

    def _pass_through(self, row: int, col: int, top: dict[fx.Node, torch.Tensor],
                      left: dict[fx.Node, torch.Tensor],
                      hand_on: Callable[[HaloNode, _Block], None]) -> None:
        """A tile that need not run: its regions are zeros (no selected output depends on
        them), but the strips it was given from above and from the left are handed on as a
        computed tile would, since a strip can be deeper than one tile's region."""
        for entry in self.program.nodes:
            if not entry.stores_halo:
                continue
            template = top.get(entry.node, left.get(entry.node))
            if template is None:  # nothing computed before: the next tiles make zeros
                continue
            height = entry.rows[row + 1] - entry.rows[row]
            width = entry.cols[col + 1] - entry.cols[col]
            region = template.new_zeros(_with_size(template.shape, entry.dims,
                                                   (height, width)))
            hand_on(entry, self._block(entry, region, row, col, top, left, None))

    def _hand_on(self, entry: HaloNode, block: _Block, row: int, col: int,
                 left: dict[fx.Node, torch.Tensor], next_top: dict[fx.Node, torch.Tensor],
                 ) -> None:
        """Keep what the next tile (left halo) and the next tile row (top halo) need."""
        y0, y1 = entry.rows[row], entry.rows[row + 1]
        x0, x1 = entry.cols[col], entry.cols[col + 1]
        hdim, wdim = entry.dims
        if entry.left:  # a copy: a view would keep the whole block alive
            left[entry.node] = block.part(entry.dims, y0, y1, max(0, x1 - entry.left),
                                          x1).clone()
        if entry.up:
            ty0 = max(0, y1 - entry.up)
            if entry.node not in next_top:
                shape = _with_size(block.tensor.shape, entry.dims, (y1 - ty0, entry.size[1]))
                # zeros: where a skipped tile (`regions` with needs) leaves columns unwritten
                next_top[entry.node] = block.tensor.new_zeros(shape)
            _narrow2(next_top[entry.node], entry.dims, 0, y1 - ty0, x0, x1).copy_(
                block.part(entry.dims, ty0, y1, x0, x1))

    # -- backward --------------------------------------------------------------------------

    def backward(self, grad_fmap: torch.Tensor, params: list[torch.Tensor],
                 write: Callable[[Box, torch.Tensor], None] | None,
                 ) -> list[torch.Tensor | None]:
        """Tiles in reverse raster order, under the forward's autocast state; returns the
        parameter gradients and hands the input gradient to `write` tile by tile (bottom-up),
        if given. The halo strips kept from the forward are freed as soon as their tile
        (left) or tile row (top) is done, so memory falls as the backward proceeds; a second
        backward cannot run."""
        with self.io.autocast():
            return self._backward(grad_fmap, params, write)

    def _backward(self, grad_fmap: torch.Tensor, params: list[torch.Tensor],
                  write: Callable[[Box, torch.Tensor], None] | None,
                  ) -> list[torch.Tensor | None]:
        if self.keep and not self.saved_top:
            raise RuntimeError("this streamed feature map was back-propagated before: the "
                               "halo engine frees what it kept for the backward as it goes, "
                               "so run the forward again instead of retain_graph=True")
        program = self.program
        rows, cols = program.grid
        self._mark_needs_grad(params, write is not None)
        result = program.result
        inp = next(e for e in program.nodes if e.kind == "input")
        param_grads = GradientSum(params)
        grad_next_top: dict[fx.Node, torch.Tensor] = {}
        done = 0
        self.io.expect(reversed(self.program.input_boxes()))
        with param_grads.collecting():  # parameter gradients summed as they come
            for row in reversed(range(rows)):
                top_saved = self.saved_top.pop()
                grad_top: dict[fx.Node, torch.Tensor] = {}
                grad_left: dict[fx.Node, torch.Tensor] = {}
                for col in reversed(range(cols)):
                    top = {n: t.detach().requires_grad_(self.program.by_fx[n].needs_grad)
                           for n, t in top_saved.items()}
                    left = {n: self.saved_left.pop((row, col, n)).detach().requires_grad_(
                        self.program.by_fx[n].needs_grad)
                        for n in (e.node for e in program.nodes if e.left)
                        if (row, col, n) in self.saved_left}
                    y0, y1 = inp.rows[row], inp.rows[row + 1]
                    x0, x1 = inp.cols[col], inp.cols[col + 1]
                    crop = self.io.read((y0, y1, x0, x1)).detach().requires_grad_(
                        write is not None)
                    outputs: list[torch.Tensor] = []
                    grads: list[torch.Tensor] = []

                    def collect(entry: HaloNode, block: _Block, row: int = row, col: int = col,
                                grad_left: dict = grad_left, grad_next_top: dict = grad_next_top,
                                outputs: list = outputs, grads: list = grads) -> None:
                        """Halo strips this tile handed on, with the gradients sent back (as
                        copies: a view would keep the whole block alive through the backward)."""
                        if not entry.needs_grad:
                            return
                        ey0, ey1 = entry.rows[row], entry.rows[row + 1]
                        ex0, ex1 = entry.cols[col], entry.cols[col + 1]
                        if entry.left and entry.node in grad_left:
                            outputs.append(block.part(entry.dims, ey0, ey1,
                                                      max(0, ex1 - entry.left), ex1).clone())
                            grads.append(grad_left.pop(entry.node))
                        if entry.up and entry.node in grad_next_top:
                            ty0 = max(0, ey1 - entry.up)
                            outputs.append(block.part(entry.dims, ty0, ey1, ex0, ex1).clone())
                            grads.append(_narrow2(grad_next_top[entry.node], entry.dims, 0,
                                                  ey1 - ty0, ex0, ex1))

                    # values saved as how to recompute them
                    recipes = Recipes() if program.recomputes else None
                    with torch.enable_grad(), recipes.hooks() if recipes else nullcontext():
                        out = self._tile(row, col, top, left, collect, input_region=crop,
                                         recipes=recipes)
                    oy0, oy1 = result.rows[row], result.rows[row + 1]
                    ox0, ox1 = result.cols[col], result.cols[col + 1]
                    outputs.append(out)
                    grads.append(_narrow2(grad_fmap, result.dims, oy0, oy1, ox0, ox1).to(out.dtype))
                    leaves_top = [n for n in top if top[n].requires_grad]
                    leaves_left = [n for n in left if left[n].requires_grad]
                    inputs = ([crop] if write is not None else []) + \
                        [top[n] for n in leaves_top] + [left[n] for n in leaves_left] + params
                    keep = [i for i, o in enumerate(outputs) if o.requires_grad and o.numel()]
                    got: Sequence[torch.Tensor | None] = [None] * len(inputs)
                    if keep and inputs:
                        got = torch.autograd.grad([outputs[i] for i in keep],
                                                  inputs, [grads[i] for i in keep],
                                                  allow_unused=True)
                    got = list(got)
                    if write is not None:
                        grad_crop = got.pop(0)
                        write((y0, y1, x0, x1),
                                   torch.zeros_like(crop) if grad_crop is None else grad_crop)
                        del grad_crop
                    _take_halo_grads(got, leaves_top, grad_top, leaves_left, grad_left)
                    # this tile's values go before the next tile allocates its own
                    del got, out, outputs, grads, crop, top, left, collect, recipes
                    done += 1
                    self.io.report("backward", done)
                grad_next_top = grad_top
        return param_grads.sums

    def _mark_needs_grad(self, params: list[torch.Tensor], image: bool) -> None:
        """Which nodes carry gradient: downstream of the image (if wanted) or a parameter."""
        wanted = {id(p) for p in params}
        flagged: set[fx.Node] = set()
        for entry in self.program.nodes:
            node = entry.node
            if entry.kind == "input":
                hit = image
            elif node.op == "call_module":
                module = self.stream.get_submodule(str(node.target))
                hit = any(id(p) in wanted for p in module.parameters())
            elif node.op == "get_attr":
                hit = id(fetch_attr(self.stream, str(node.target))) in wanted
            else:
                hit = False
            if hit or any(n in flagged for n in node.all_input_nodes):
                flagged.add(node)
            entry.needs_grad = node in flagged


def _padded_span(first: int, last: int, full: int, extent: int, stride: int,
                 ) -> tuple[int, int, int, int] | None:
    """How a convolution with symmetric padding reads input [first, last) of an axis of
    length `full` (zeros outside): (start, stop, padding, leading outputs to drop), or None.

    The crop is [max(0, first), min(full, last)) and the padding the larger of the two
    overhangs, so the convolution's windows reach `last`; its first window starts
    `padding - overhang before` rows before `first`, which must be a whole number of strides.
    The outputs the padding adds on the other side are computed and dropped, so this is
    None (pad explicitly) where they would be more than 1/16 of the wanted ones (regions a
    few outputs wide in deep layers, where the copy is small anyway).
    """
    before, after = max(0, -first), max(0, last - full)
    padding = max(before, after)
    lead = padding - before
    start, stop = max(0, first), min(full, last)
    wanted = (last - first - extent) // stride + 1
    computed = (stop - start + 2 * padding - extent) // stride + 1
    if lead % stride or 16 * (computed - wanted) > wanted:
        return None
    return start, stop, padding, lead // stride


def _exact_conv(entry: HaloNode, block: _Block, src: HaloNode, region: Box,
                ) -> tuple[torch.Tensor, Callable[[Any, Any], torch.Tensor]]:
    """(crop, call): the region of a plain Conv2d is `call((crop,), {})`, from exactly the
    input it needs: output j reads input [j*s - p, j*s - p + e). Beyond the image's border
    the convolution's own padding supplies the zeros (an explicit pad would copy the crop, and
    autograd would keep the copy beside the block it came from); the few outputs that padding
    adds on the other side are dropped. Where the grid does not allow that, the crop is
    padded explicitly."""
    conv = entry.module
    assert isinstance(conv, nn.Conv2d)
    reads = _conv_reads(entry.axes, region)
    if conv.stride != (1, 1) and all(e == 1 and p == 0 for e, _, p in entry.axes):
        # a strided 1x1 convolution (ResNet's downsample) samples every s-th pixel: the
        # crop of those is 1/s^2 of the copy the convolution makes of a non-contiguous crop
        ((ya, yb), (xa, xb)), ((_, sy, _), (_, sx, _)) = reads, entry.axes
        return block.part(src.dims, ya, yb, xa, xb)[..., ::sy, ::sx], functools.partial(
            _sampled_conv, conv)
    spans = [_padded_span(first, last, full, extent, stride)
             for (first, last), full, (extent, stride, _) in zip(reads, src.size, entry.axes)]
    if None in spans:
        (ya, yb), (xa, xb) = [(max(0, first), min(full, last))
                              for (first, last), full in zip(reads, src.size)]
        pads = [(max(0, -first), max(0, last - full))
                for (first, last), full in zip(reads, src.size)]
        return block.part(src.dims, ya, yb, xa, xb), functools.partial(
            _explicitly_padded_conv, conv, (*pads[1], *pads[0]))
    (ya, yb, qy, dy), (xa, xb, qx, dx) = spans  # type: ignore[misc]
    keep = (dy, dy + region[1] - region[0], dx, dx + region[3] - region[2])
    return block.part(src.dims, ya, yb, xa, xb), functools.partial(
        _padded_conv, conv, (qy, qx), keep)


def _sampled_conv(conv: nn.Conv2d, args: Any, kwargs: Any) -> torch.Tensor:
    """A 1x1 convolution without padding run with stride 1 on the pixels it samples."""
    return F.conv2d(args[0], conv.weight, conv.bias, 1, 0, 1, conv.groups)


def _padded_conv(conv: nn.Conv2d, padding: tuple[int, int], keep: Box, args: Any,
                 kwargs: Any) -> torch.Tensor:
    """Rows and columns `keep` of `conv` run on args[0] with symmetric `padding`."""
    out = F.conv2d(args[0], conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                   conv.groups)
    return _narrow2(out, (2, 3), *keep)


def _explicitly_padded_conv(conv: nn.Conv2d, pads: tuple[int, int, int, int], args: Any,
                            kwargs: Any) -> torch.Tensor:
    """`conv` run on args[0] padded by (left, right, top, bottom) zeros (a copy)."""
    return F.conv2d(F.pad(args[0], pads), conv.weight, conv.bias, conv.stride, 0,
                    conv.dilation, conv.groups)


def _cropped_window(module: nn.Module, keep: Box, args: Any, kwargs: Any) -> torch.Tensor:
    """Rows and columns `keep` of a pooling (or other window) module run on args[0]."""
    return _narrow2(module(args[0]), (2, 3), *keep)


def _joined(above: torch.Tensor | None, left: torch.Tensor | None, region: torch.Tensor,
            dims: tuple[int, int]) -> torch.Tensor:
    """[above; left | region] without autograd, each part copied once into the new block
    (two torch.cat calls copy the region twice: 4% of a predict at 1024 px, tile 256)."""
    if above is None and left is None:
        return region
    hdim, wdim = dims
    up = 0 if above is None else above.shape[hdim]
    width = 0 if left is None else left.shape[wdim]
    shape = list(region.shape)
    shape[hdim] += up
    shape[wdim] += width
    channels_last = region.dim() == 4 and dims == (2, 3) and not region.is_contiguous() \
        and region.is_contiguous(memory_format=torch.channels_last)
    block = torch.empty(shape, dtype=region.dtype, device=region.device, memory_format=(
        torch.channels_last if channels_last else torch.contiguous_format))
    if above is not None:
        block.narrow(hdim, 0, up).copy_(above)
    lower = block.narrow(hdim, up, region.shape[hdim])
    if left is not None:
        lower.narrow(wdim, 0, width).copy_(left)
    lower.narrow(wdim, width, region.shape[wdim]).copy_(region)
    return block


def _cat(args: Any, kwargs: Any) -> torch.Tensor:
    return torch.cat(*args, **kwargs)


def _conv_reads(axes: tuple[tuple[int, int, int], ...], region: Box) -> list[tuple[int, int]]:
    """Per axis the input [first, last) that a convolution's outputs `region` read (output j
    reads [j*s - p, j*s - p + e); the ends may lie beyond the image)."""
    return [(r0 * stride - pad, (r1 - 1) * stride - pad + extent)
            for (extent, stride, pad), (r0, r1) in zip(axes, (region[:2], region[2:]))]


def _take_halo_grads(got: list[torch.Tensor | None], leaves_top: list[fx.Node],
                     grad_top: dict[fx.Node, torch.Tensor], leaves_left: list[fx.Node],
                     grad_left: dict[fx.Node, torch.Tensor]) -> None:
    """Move the gradients of a tile's halo leaves from the front of `got` to the tiles that
    produced the strips (the line buffers' gradients are full width and summed over the
    tiles of a row)."""
    for n in leaves_top:
        grad = got.pop(0)
        if grad is not None:
            grad_top[n] = _compact(grad) if n not in grad_top else grad_top[n] + grad
    for n in leaves_left:
        grad = got.pop(0)
        if grad is not None:
            grad_left[n] = _compact(grad)


class _OwnGradient(torch.autograd.Function):
    """Identity whose backward hands on the gradient in storage of its own size. A left halo
    leaf is concatenated into a block, so its gradient is a view into the block's gradient,
    which autograd would keep alive until the tile's whole backward is done (the leaf's
    gradient is returned at the end)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _compact(grad)


def _compact(grad: torch.Tensor) -> torch.Tensor:
    """`grad` in storage of its own size: the gradient of a halo strip is often a view into
    the gradient of the whole block it was concatenated into, which it would keep alive."""
    if grad.untyped_storage().nbytes() > grad.numel() * grad.element_size():
        return grad.clone()
    return grad


def _with_size(shape: Sequence[int], dims: tuple[int, int],
               size: tuple[int, int]) -> tuple[int, ...]:
    out = list(shape)
    out[dims[0]], out[dims[1]] = size
    return tuple(out)


def _module_channels(module: nn.Module | None, in_channels: int) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else in_channels
