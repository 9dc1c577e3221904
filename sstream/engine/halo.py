"""Halo streaming: every layer computes each of its outputs once, tile by tile.

The crop approach (streaming.py) recomputes a receptive-field-wide margin around every tile.
Here tiles are processed in raster order and every node of the stream's fx graph keeps the
boundary rows and columns of its output (its *halo*) that the next tiles' consumers still need,
as line-buffer image pipelines do. Per axis, input tile k makes the first `A_v[k+1]` outputs of
node v computable (the schedule): for a sliding-window node (extent e, stride s, left padding
p) over input u,

    A_v = L_v                               if A_u = L_u (the input is complete)
    A_v = floor((A_u + p - e) / s) + 1      else (clipped to [0, L_v]; 0 if A_u = 0)

and for a per-pixel node the minimum over its inputs. A window node whose regions would be tiny
while its source's are small too waits until a minimum region is computable (`_gathered`):
deep layers run on regions gathered from several tiles. Tile (r, c) computes node v's *region*
rows [A_v[r], A_v[r+1]) x columns [B_v[c], B_v[c+1]) (the regions of all tiles partition v's
output: each output is computed once). A window node computes its region by running its module
on the input rows [c0, A_u[r+1]) with c0 = max(0, (A_v[r] - ceil(p/s)) * s): c0 is a multiple
of s, so the module's sampling grid is the global one; the module's own padding at an interior
crop edge touches only the first ceil(p/s) outputs, which are dropped; at a true image border
the crop's border is the image's (the exactness argument of docs/design.md, applied per layer). A
plain `nn.Conv2d` is run functionally, without the dropped outputs: on exactly the input rows
[A_v[r]*s - p, (A_v[r+1] - 1)*s - p + e), with zeros beyond the image's border supplied by its
own padding (`_padded_span`; in deep layers, whose regions are a few outputs wide, the dropped
outputs were a third of the work).

Each node's *block* for a tile is its region plus the halo above (rows kept from the previous
tile row, a full-width line buffer `up` rows high) and to the left (`left` columns kept from
the previous tile), assembled as

    block = [ top_in           ]     rows [A[r] - up, A[r+1]), columns [B[c] - left, B[c+1])
            [ left_in | region ]

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

Graphs this engine cannot run exactly (in-place ops on values that have other readers,
operands of different spatial sizes, padding as large as a kernel's extent, whose outputs see
only padding) are detected when the program is built; StreamingCNN
then falls back to the crop engine.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from sstream.engine.geometry import (
    UnsupportedModuleError,
    conv_axes,
    fetch_attr,
    meta_call,
    pool_axes,
    spatial_dims,
    traced_values,
)
from sstream.engine.saving import AutocastState, GradientSum, Recipes
from sstream.engine.tiling import OutputMask

Box = tuple[int, int, int, int]

_WINDOW_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
}
# methods whose result may be the very tensor they are called on
_ALIASING_METHODS = {"contiguous", "float", "double", "half", "bfloat16", "detach"}


@dataclass
class _Node:
    """One graph node as the halo engine runs it.

    kind: "input", "window", "pointwise" (per pixel: any local op that is not a window),
    "constant" (does not depend on the input) or "output". Region schedules per axis:
    `rows[k]` = outputs computable after input tile row k - 1 (rows[0] = 0).
    """

    node: fx.Node
    kind: str
    dims: tuple[int, int] = (2, 3)           # positions of (height, width) in the tensor
    size: tuple[int, int] = (0, 0)           # full-image (height, width) of the output
    sources: tuple[fx.Node, ...] = ()        # spatial inputs
    module: nn.Module | None = None
    axes: tuple[tuple[int, int, int], ...] = ()  # window: per axis (extent, stride, pad)
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    up: int = 0                              # halo rows kept for the next tile row
    left: int = 0                            # halo columns kept for the next tile
    call: Callable[..., Any] | None = None   # pointwise: out-of-place version of the op
    needs_grad: bool = False
    per_pixel: int = 0                       # elements per output position (N * C ...)
    derived: bool = False  # per-pixel node whose block is computed from its inputs' blocks
    exact_input: bool = False  # a plain Conv2d run on exactly the input its region needs
    recompute: bool = False  # cheap enough to recompute in the backward (`_mark_recomputed`)

    def input_start(self, axis: int, region0: int) -> int:
        """First input row (axis 0) or column (1) this window node reads for outputs from
        `region0`: exactly `region0 * s - p` for a plain convolution (zeros are added only at
        the image border), else aligned to the stride so the module's own padding at a crop
        edge touches only outputs that are dropped."""
        _, stride, pad = self.axes[axis]
        if self.exact_input:
            return max(0, region0 * stride - pad)
        return _window_start(region0, stride, pad)

    @property
    def stores_halo(self) -> bool:
        """Whether this node keeps halo strips (line buffer, left columns) between tiles."""
        return bool(self.up or self.left) and not self.derived


def _spans(schedule: list[int]) -> list[int]:
    """Outputs per region along an axis, tile by tile (0 where a tile computes none)."""
    return [b - a for a, b in zip(schedule, schedule[1:])]


def _thin_halo(entry: _Node) -> bool:
    """Whether the node's halo is at most a quarter of its smallest region, per axis."""
    def smallest(schedule: list[int]) -> int:
        return min((span for span in _spans(schedule) if span), default=0)
    return 4 * entry.up <= smallest(entry.rows) and 4 * entry.left <= smallest(entry.cols)


def _window_start(region0: int, stride: int, pad: int) -> int:
    """First input row of the crop computing outputs from `region0` (a multiple of stride)."""
    return max(0, (region0 - -(-pad // stride)) * stride)


def _window_schedule(avail: int, full_in: int, full_out: int, axis: tuple[int, int, int]) -> int:
    extent, stride, pad = axis
    if avail >= full_in:
        return full_out
    if avail <= 0:
        return 0
    return max(0, min(full_out, (avail + pad - extent) // stride + 1))


# Outputs a gathered region spans, (rows, columns). Predict: ResNet-18 with tile 256 took
# 1.14x / 1.13x plain at 1024 / 2048 px with 32, 1.11x / 1.08x with 64, 1.05x / 1.04x with 96
# on both axes (from layer1 on, regions then span 2 x 2 tiles). Rows cost memory, columns do
# not: every gathered row waits in a line buffer as wide as the image (ResNet-18, tile 512,
# at 100,000 px: 2.5 GiB a buffer with 96 rows, 250 MiB with 16), the columns only in the
# left strips, one tile high. 16 rows by 96 columns ran the pooling forward as fast as 96 by
# 96 (2048 px, tile 256: 2.61 s against 2.67-2.90 s; 16 by 16: 2.95-3.02 s). Training keeps
# every line-buffer row for the backward, once per tile row, so gathering costs memory there
# twice over: 16 halves the kept strips of ResNet-18 at 2048 px, tile 256 (201 -> 106 MiB) and
# ResNet-34 at 8192 px, tile 512 (1751 -> 1154 MiB); a step took 2% longer at tile 512 and 8%
# at 1024 px, tile 256.
MIN_REGION_PREDICT = (16, 96)
MIN_REGION_TRAINING = (16, 16)


def _gathered(schedule: list[int], source: list[int], min_region: int) -> list[int]:
    """A window node's `schedule` delayed so that every region but the last spans at least
    `min_region` outputs, where its source's regions are that small too: deep layers (a 256
    px tile is 8 outputs of ResNet's last stage) then run on regions gathered from several
    tiles, while the few source rows and columns they wait for stay in the line buffers.
    Tiny regions spend most of a convolution's time reading its weights."""
    if max(_spans(source)) > min_region:
        return schedule
    out = [0]
    for avail in schedule[1:-1]:
        out.append(avail if avail - out[-1] >= min_region else out[-1])
    return out + schedule[-1:]


_OutputWindow = tuple[int, int, int]  # (R, a, b): see HaloProgram.output_windows


@dataclass(frozen=True)
class TileNeeds:
    """Per tile (rows x columns of the halo grid): whether it runs, and whether it reads its
    input (a tile that runs only for deeper layers' regions runs on zeros)."""

    runs: torch.Tensor   # bool (rows, cols)
    reads: torch.Tensor  # bool (rows, cols)


def _output_ranges(schedule: list[int], ratio: int, before: int, after: int) -> torch.Tensor:
    """(tiles, 2): per tile the half-open range of stream outputs that depend on the node's
    region [A[k], A[k+1]) along one axis (empty where the region is): output j reads
    [j*R - a, j*R + b], so j from ceil((A[k] - b) / R) to floor((A[k+1] - 1 + a) / R)."""
    edges = torch.tensor(schedule, dtype=torch.int64)
    first = -((after - edges[:-1]) // ratio)  # ceil((A[k] - b) / R)
    last = (edges[1:] - 1 + before) // ratio + 1
    last = torch.where(edges[1:] > edges[:-1], last, first)  # empty regions need nothing
    return torch.stack([first, last], dim=1)


class HaloProgram:
    """The halo schedule of one stream for one input size; `None` from `build` if unsupported."""

    def __init__(self, nodes: list[_Node], edges: tuple[list[int], list[int]],
                 training: bool) -> None:
        self.nodes = nodes
        self.training = training
        self.min_region = MIN_REGION_TRAINING if training else MIN_REGION_PREDICT
        self.by_fx = {n.node: n for n in nodes}
        self.edges = edges
        self.output = next(n for n in nodes if n.kind == "output")
        self.result = self.by_fx[self.output.sources[0]]
        # values a tile no longer needs after node i: freed at once, as plain PyTorch does
        last_use = {n.node: i for i, n in enumerate(nodes)}
        for i, entry in enumerate(nodes):
            for source in entry.node.all_input_nodes:
                last_use[source] = i
        self.release_after: list[list[fx.Node]] = [[] for _ in nodes]
        for node, i in last_use.items():
            self.release_after[i].append(node)
        # dtype a window module gives, per (node, input dtype, autocast state): found
        # by running it once on a probe (a slow 3x3 convolution off oneDNN, once per run
        # before this was kept with the program: 1% of a predict at 1024 px, tile 256)
        self.empty_dtypes: dict[tuple[Any, ...], torch.dtype] = {}
        self.recomputes = False  # whether a tile's backward recomputes any value

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.edges[0]) - 1, len(self.edges[1]) - 1

    def saved_halo_elements(self) -> int:
        """Elements of the halo strips a training step keeps from the forward pass for the
        backward: per node, `up` full-width rows per tile row and `left` columns per tile."""
        total = 0
        for n in self.nodes:
            if not n.stores_halo:
                continue
            if n.up:
                total += n.per_pixel * n.size[1] * sum(min(n.up, a) for a in n.rows[1:-1])
            if n.left:
                total += n.per_pixel * n.size[0] * sum(min(n.left, b) for b in n.cols[1:-1])
        return total

    def line_buffer_elements(self) -> int:
        """Elements of one full-width row of top halo strips: a tile row's share of the
        strips kept for the backward, and the size of the gradient line buffer the
        backward hands from one tile row to the next."""
        return sum(n.per_pixel * n.size[1] * n.up for n in self.nodes if n.stores_halo)

    def output_windows(self) -> dict[fx.Node, tuple[_OutputWindow, _OutputWindow]] | None:
        """Per node and axis (R, a, b): the stream's output j depends on this node's positions
        [j*R - a, j*R + b] only; nodes the output does not depend on are absent. The
        window arithmetic of docs/design.md run from the output back: through a window op
        (extent e, stride s, left padding p), R <- R*s, a <- a*s + p, b <- b*s + e - 1 - p;
        branches take the maximum. None where branches disagree on R (no node is then known
        to be unneeded)."""
        windows: dict[fx.Node, tuple[_OutputWindow, _OutputWindow]] = {
            self.result.node: ((1, 0, 0), (1, 0, 0))}
        for entry in reversed(self.nodes):
            mine = windows.get(entry.node)
            if mine is None or entry.kind not in ("window", "pointwise"):
                continue
            theirs = mine
            if entry.kind == "window":
                theirs = tuple((ratio * s, a * s + p, b * s + e - 1 - p)  # type: ignore[misc]
                               for (ratio, a, b), (e, s, p) in zip(mine, entry.axes))
            for source in entry.sources:
                known = windows.get(source)
                if known is None:
                    windows[source] = theirs
                    continue
                if any(k[0] != t[0] for k, t in zip(known, theirs)):
                    return None
                windows[source] = tuple((k[0], max(k[1], t[1]), max(k[2], t[2]))  # type: ignore
                                        for k, t in zip(known, theirs))
        return windows

    def input_boxes(self, needs: TileNeeds | None = None) -> list[Box]:
        """The input regions a forward reads, in raster order (with `needs`, only the tiles
        that run and read): what the image source is told to expect."""
        entry = next(e for e in self.nodes if e.kind == "input")
        rows, cols = self.grid
        return [(entry.rows[r], entry.rows[r + 1], entry.cols[c], entry.cols[c + 1])
                for r in range(rows) for c in range(cols)
                if needs is None or (needs.runs[r, c] and needs.reads[r, c])]

    def tiles_needed(self, mask: OutputMask) -> TileNeeds:
        """Which tiles a forward pass must run for the outputs `mask` selects, and which of
        them must read their input (the others run on zeros).

        Node v's region in tile (r, c) is needed where it holds a position some selected
        output depends on (`output_windows`: a rectangle query on the mask per node and
        tile); a tile runs where any node's region is needed. Exact: a needed value depends
        only on needed values, each computed in a tile that runs, from real pixels; what a
        skipped tile would have computed, and every value computed from it, no selected
        output depends on. Skipped tiles still hand on the halo strips they were given
        (`HaloRun._pass_through`): a strip can cross a tile whose own regions are not needed.
        """
        rows, cols = self.grid
        windows = self.output_windows()
        if windows is None:
            everything = torch.ones((rows, cols), dtype=torch.bool)
            return TileNeeds(everything, everything)
        runs = torch.zeros((rows, cols), dtype=torch.bool)
        reads = runs
        for entry in self.nodes:
            if entry.node not in windows:
                continue
            (ry, ay, by), (rx, ax, bx) = windows[entry.node]
            needed = mask.count_in(_output_ranges(entry.rows, ry, ay, by),
                                   _output_ranges(entry.cols, rx, ax, bx)) > 0
            runs = runs | needed
            if entry.kind == "input":
                reads = needed
        return TileNeeds(runs, reads)

    @staticmethod
    def build(stream: nn.Module, input_shape: Sequence[int], row_edges: list[int],
              col_edges: list[int], training: bool) -> HaloProgram | None:
        """Plan the halo engine for input (N, C, H, W) and tile edges (input pixels, from 0 to
        H resp. W, strictly increasing), for a forward pass only or for `training` (deep
        layers gathered less: MIN_REGION_TRAINING); None when the stream needs the crop
        engine."""
        if any(b <= a for a, b in zip(row_edges, row_edges[1:])) or \
                any(b <= a for a, b in zip(col_edges, col_edges[1:])):
            return None
        try:
            graph, values = traced_values(stream)
        except UnsupportedModuleError:
            return None
        shapes = _meta_shapes(stream, graph, tuple(int(s) for s in input_shape))
        nodes: list[_Node] = []
        for node in graph.nodes:
            entry = _classify(node, stream, values, shapes)
            if entry is None:
                return None
            nodes.append(entry)
        program = HaloProgram(nodes, (list(row_edges), list(col_edges)), training)
        if not program._schedule():
            return None
        program.recomputes = _mark_recomputed(nodes, program.result)
        return program

    def _schedule(self) -> bool:
        """Fill rows/cols schedules and the halo sizes; False if something does not fit."""
        for entry in self.nodes:
            if entry.kind in ("constant", "output"):
                continue
            for axis, edges in enumerate(self.edges):
                if entry.kind == "input":
                    sched = list(edges)
                elif entry.kind == "window":
                    src = self.by_fx[entry.sources[0]]
                    src_sched, src_full = (src.rows, src.cols)[axis], src.size[axis]
                    sched = _gathered([_window_schedule(a, src_full, entry.size[axis],
                                                        entry.axes[axis]) for a in src_sched],
                                      src_sched, self.min_region[axis])
                else:
                    scheds = [(self.by_fx[s].rows, self.by_fx[s].cols)[axis]
                              for s in entry.sources]
                    sched = [min(column) for column in zip(*scheds)]
                if sched[-1] != entry.size[axis] or sched[0] != 0:
                    return False
                if axis == 0:
                    entry.rows = sched
                else:
                    entry.cols = sched
        for entry in self.nodes:  # halo each input must keep for this consumer
            if entry.kind not in ("window", "pointwise"):
                continue
            for source in entry.sources:
                src = self.by_fx[source]
                for axis in range(2):
                    mine = (entry.rows, entry.cols)[axis]
                    theirs = (src.rows, src.cols)[axis]
                    need = 0
                    for k in range(len(mine) - 1):
                        if mine[k + 1] == mine[k]:
                            continue
                        if entry.kind == "window":
                            start = entry.input_start(axis, mine[k])
                        else:
                            start = mine[k]
                        need = max(need, theirs[k] - start)
                    if axis == 0:
                        src.up = max(src.up, need)
                    else:
                        src.left = max(src.left, need)
        # A per-pixel node on the same schedule as its inputs computes its whole block (halo
        # included: a few rows of cheap per-pixel work) from its inputs' blocks instead of
        # keeping its own halo; halos then live only at window-op outputs, and autograd keeps
        # one block per layer instead of a region plus a block (as plain PyTorch would).
        # Without autograd nothing is kept, so there only where the halo is a few rows: the
        # source of a gathered consumer holds up to `min_region` rows, and recomputing them
        # for every tile cost 3% of a ResNet-18 predict.
        for entry in reversed(self.nodes):
            if entry.kind != "pointwise" or not (entry.up or entry.left):
                continue
            sources = [self.by_fx[s] for s in entry.sources]
            if all(src.rows == entry.rows and src.cols == entry.cols for src in sources) and \
                    (self.training or _thin_halo(entry)):
                entry.derived = True
                for src in sources:
                    src.up, src.left = max(src.up, entry.up), max(src.left, entry.left)
        return True


def _classify(node: fx.Node, root: nn.Module, values: dict[fx.Node, Any],
              shapes: dict[fx.Node, Any]) -> _Node | None:
    if node.op == "output":
        return _Node(node, "output", sources=(node.args[0],))
    dims = spatial_dims(values.get(node))
    if dims is None:
        return _Node(node, "constant")
    shape = shapes[node]
    size = (int(shape[dims[0]]), int(shape[dims[1]]))
    per_pixel = math.prod(int(d) for i, d in enumerate(shape) if i not in dims)
    entry = _classify_spatial(node, root, values, shapes, dims, size)
    if entry is not None:
        entry.per_pixel = per_pixel
    return entry


def _classify_spatial(node: fx.Node, root: nn.Module, values: dict[fx.Node, Any],
                      shapes: dict[fx.Node, Any], dims: tuple[int, int],
                      size: tuple[int, int]) -> _Node | None:
    if node.op == "placeholder":
        return _Node(node, "input", dims, size)
    sources = tuple(dict.fromkeys(n for n in node.all_input_nodes
                                  if spatial_dims(values.get(n)) is not None))
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if isinstance(module, _WINDOW_MODULES):
            axes = conv_axes(module) if isinstance(module, nn.Conv2d) else pool_axes(module)
            if any(max(before, after) >= extent for extent, _, before, after in axes):
                return None  # outputs that see only padding: the crop engine handles them
            return _Node(node, "window", dims, size, sources, module,
                         tuple((e, s, p) for e, s, p, _ in axes),
                         exact_input=type(module) is nn.Conv2d)
    for source in sources:  # per-pixel ops: spatial operands must not broadcast over space
        src_dims = spatial_dims(values[source])
        src_shape = shapes[source]
        if (int(src_shape[src_dims[0]]), int(src_shape[src_dims[1]])) != size:
            return None
    call = _out_of_place(node, root)
    if call is None:
        return None
    return _Node(node, "pointwise", dims, size, sources, call=call,
                 recompute=_cheap(node, root))


_CHEAP_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.batchnorm",
                  "torch.nn.modules.dropout")


def _cheap(node: fx.Node, root: nn.Module) -> bool:
    """Whether a per-pixel node costs little to recompute: functions and methods (sums,
    products, activations) and normalisation/activation modules, not arbitrary modules
    (a Linear over channels, say, is a matrix product)."""
    if node.op != "call_module":
        return True
    module = root.get_submodule(str(node.target))
    return type(module).__module__ in _CHEAP_MODULES


def _mark_recomputed(nodes: list[_Node], result: _Node) -> bool:
    """Mark the values a tile's backward recomputes instead of keeping (and say whether there are
    any): where that saves at least 1/16 of the feature map (less is under 3% of a peak that
    holds the feature map and its gradient, and costs time per tile: a 1x1 stream in 64 px tiles
    spent a third of its step recomputing). Cheap per-pixel values are recomputed if, together,
    one tile's of them are that large. So are the outputs of convolutions that read the image,
    or cheap per-pixel values of it, which the tile keeps anyway (a ResNet stem's output is its
    largest activation, and recomputing it costs one of its smallest convolutions), each if its
    own tile output is that large. Deeper layers are not recomputed: a value recomputed in the
    middle of the backward brings back every value it is computed from while the layers after it
    still hold theirs (recomputing ResNet's max pool raised the peak instead of lowering it)."""
    worth = result.per_pixel * result.size[0] * result.size[1] / 16
    if sum(_largest_region(e) for e in nodes if e.kind == "pointwise" and e.recompute) < worth:
        for entry in nodes:
            entry.recompute = False
    from_image: set[fx.Node] = set()
    for entry in nodes:
        if entry.kind == "window":
            entry.recompute = isinstance(entry.module, nn.Conv2d) and \
                entry.sources[0] in from_image and _largest_region(entry) >= worth
        if entry.kind == "input" or (entry.kind == "pointwise" and entry.recompute and all(
                s in from_image for s in entry.sources)):
            from_image.add(entry.node)
    return any(entry.recompute for entry in nodes)


def _largest_region(entry: _Node) -> int:
    """Elements of the node's largest region (one tile's output of it)."""
    return entry.per_pixel * max(_spans(entry.rows)) * max(_spans(entry.cols))


def _out_of_place(node: fx.Node, root: nn.Module) -> Callable[..., Any] | None:
    """A callable (args, kwargs, as_written=False) -> value computing the node without
    mutating its operands, or with `as_written` as the graph says (in place, if it is).

    In-place ops are exact out of place only if nobody else reads the operand they mutate;
    otherwise None (the crop engine runs such streams as written). Without autograd the
    engine runs them as written: the operand is then a value of this tile's that nobody
    reads afterwards (strips handed on are copies), and plain PyTorch's ResNet saves an
    allocation per activation that way.
    """
    inplace = False
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        inplace = bool(getattr(module, "inplace", False))

        def call(args: Any, kwargs: Any, as_written: bool = False) -> Any:
            if as_written or not inplace:
                return module(*args, **kwargs)
            module.inplace = False  # restored at once: no other code runs in between
            try:
                return module(*args, **kwargs)
            finally:
                module.inplace = True
    elif node.op == "call_function":
        written = target = node.target
        if target in _INPLACE_FUNCTIONS:
            target, inplace = _INPLACE_FUNCTIONS[target], True
        if node.kwargs.get("inplace", False):
            inplace = True

        def call(args: Any, kwargs: Any, as_written: bool = False) -> Any:
            if as_written:
                return written(*args, **kwargs)
            if "inplace" in kwargs:
                kwargs = {**kwargs, "inplace": False}
            return target(*args, **kwargs)
    elif node.op == "call_method":
        written = name = str(node.target)
        if name.endswith("_") and not name.endswith("__"):
            name, inplace = name[:-1], True

        def call(args: Any, kwargs: Any, as_written: bool = False) -> Any:
            return getattr(args[0], written if as_written else name)(*args[1:], **kwargs)
    else:
        return None
    if inplace and not _sole_reader(node):
        return None
    if inplace and any(operand.op == "placeholder" for operand in _operand_chain(node)):
        out_of_place = call  # as written it would mutate the caller's image

        def call(args: Any, kwargs: Any, as_written: bool = False) -> Any:
            return out_of_place(args, kwargs)
    return call


def _operand_chain(node: fx.Node) -> list[fx.Node]:
    """The first operand of `node` and the values it aliases (through contiguous(), ...)."""
    chain: list[fx.Node] = []
    operand = node.args[0] if node.args else None
    while isinstance(operand, fx.Node):
        chain.append(operand)
        if operand.op != "call_method" or operand.target not in _ALIASING_METHODS:
            break
        operand = operand.args[0]
    return chain


def _sole_reader(node: fx.Node) -> bool:
    """Whether `node` is the only reader of the value its first operand holds (aliases too)."""
    return all(len(operand.users) == 1 for operand in _operand_chain(node))


def _meta_shapes(stream: nn.Module, graph: fx.Graph,
                 input_shape: tuple[int, ...]) -> dict[fx.Node, Any]:
    """Every node's output shape for the whole image, computed on the meta device."""
    shapes: dict[fx.Node, Any] = {}

    class _Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stream = stream

        def forward(self, image: torch.Tensor) -> None:
            env: dict[fx.Node, Any] = {}
            for node in graph.nodes:
                if node.op == "output":
                    break
                if node.op == "placeholder":
                    env[node] = image
                else:
                    env[node] = _run_plain(node, self.stream, env)
                if isinstance(env[node], torch.Tensor):
                    shapes[node] = tuple(env[node].shape)

    dtype = next((p.dtype for p in stream.parameters()), torch.get_default_dtype())
    meta_call(_Recorder(), torch.empty(input_shape, device="meta", dtype=dtype))
    return shapes


def _run_plain(node: fx.Node, root: nn.Module, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "get_attr":
        return fetch_attr(root, str(node.target))
    if node.op == "call_module":
        return root.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise RuntimeError(f"unexpected node {node.op}")


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

    def __init__(self, program: HaloProgram, stream: nn.Module,
                 read: Callable[[Box], torch.Tensor], keep: bool,
                 report: Callable[[str, int], None],
                 expect: Callable[[Iterable[Box]], None] | None = None) -> None:
        self.program, self.stream, self.read, self.keep = program, stream, read, keep
        self.report = report
        self.expect = expect or (lambda boxes: None)  # announces the input regions read next
        self.saved_top: list[dict[fx.Node, torch.Tensor]] = []   # per tile row
        self.saved_left: dict[tuple[int, int, fx.Node], torch.Tensor] = {}

    # -- one tile --------------------------------------------------------------------------

    def _tile(self, row: int, col: int, top: dict[fx.Node, torch.Tensor],
              left: dict[fx.Node, torch.Tensor], visit: Callable[[_Node, _Block], None],
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
                env[node] = _run_plain(node, self.stream, env)
                continue
            y0, y1 = entry.rows[row], entry.rows[row + 1]
            x0, x1 = entry.cols[col], entry.cols[col + 1]
            notes = recipes if entry.recompute else None  # where its values are noted
            if entry.kind == "input":
                region = input_region if input_region is not None else self.read(
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

    def _pointwise(self, entry: _Node, env: dict[fx.Node, Any], box: Box,
                   notes: Recipes | None) -> Any:
        """A per-pixel node over `box`, noted in `notes` as recomputable if given."""
        assert entry.call is not None
        args, kwargs = self._operands(entry, env, box)
        value = entry.call(args, kwargs, as_written=not torch.is_grad_enabled())
        if notes is not None:
            notes.note(value, entry.call, args, kwargs)
        return value

    def _operands(self, entry: _Node, env: dict[fx.Node, Any], box: Box) -> tuple[Any, Any]:
        """(args, kwargs) of a per-pixel node: spatial operands cut to the node's region."""
        def operand(node: fx.Node) -> Any:
            value = env[node]
            if isinstance(value, _Block):
                return value.part(self.program.by_fx[node].dims, *box)
            return value

        return (fx.node.map_arg(entry.node.args, operand),
                fx.node.map_arg(entry.node.kwargs, operand))

    def _window(self, entry: _Node, env: dict[fx.Node, Any], row: int, col: int,
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

    def _empty(self, entry: _Node, like: torch.Tensor, height: int, width: int) -> torch.Tensor:
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

    def _block(self, entry: _Node, region: torch.Tensor, row: int, col: int,
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
        """The stream's whole output, assembled from `regions()`."""
        result = self.program.result
        fmap: torch.Tensor | None = None
        for (oy0, oy1, ox0, ox1), out in self.regions():
            if fmap is None:
                fmap = out.new_empty(_with_size(out.shape, result.dims, result.size))
            _narrow2(fmap, result.dims, oy0, oy1, ox0, ox1).copy_(out)
        assert fmap is not None
        return fmap

    def regions(self, needs: TileNeeds | None = None,
                blank: Callable[[Box], torch.Tensor] | None = None,
                ) -> Iterator[tuple[Box, torch.Tensor]]:
        """(output box, output region) tile by tile in raster order; the regions partition the
        stream's output (some are empty: deep layers wait for gathered regions). With `needs`
        (`HaloProgram.tiles_needed`), tiles that need not run only hand on the halo strips
        they were given, yield nothing and read nothing, and tiles that need not read run on
        `blank(box)` (zeros) instead. Progress is reported once the consumer has taken a tile.
        """
        rows, cols = self.program.grid
        top: dict[fx.Node, torch.Tensor] = {}
        result = self.program.result
        done = 0
        self.expect(self.program.input_boxes(needs))
        for row in range(rows):
            if self.keep:
                self.saved_top.append(top)
            next_top: dict[fx.Node, torch.Tensor] = {}
            left: dict[fx.Node, torch.Tensor] = {}
            for col in range(cols):
                def hand_on(entry: _Node, block: _Block, row: int = row, col: int = col,
                            left: dict = left, next_top: dict = next_top) -> None:
                    self._hand_on(entry, block, row, col, left, next_top)
                    if self.keep and entry.left and col + 1 < cols:
                        self.saved_left[row, col + 1, entry.node] = left[entry.node]

                if needs is None or needs.runs[row, col]:
                    box = self._input_box(row, col)
                    zeros = None if needs is None or needs.reads[row, col] or blank is None \
                        else blank(box)
                    out = self._tile(row, col, top, left, hand_on, input_region=zeros)
                    yield (result.rows[row], result.rows[row + 1], result.cols[col],
                           result.cols[col + 1]), out
                else:
                    self._pass_through(row, col, top, left, hand_on)
                done += 1
                self.report("forward", done)
            top = next_top

    def _input_box(self, row: int, col: int) -> Box:
        entry = next(e for e in self.program.nodes if e.kind == "input")
        return (entry.rows[row], entry.rows[row + 1], entry.cols[col], entry.cols[col + 1])

    def _pass_through(self, row: int, col: int, top: dict[fx.Node, torch.Tensor],
                      left: dict[fx.Node, torch.Tensor],
                      hand_on: Callable[[_Node, _Block], None]) -> None:
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

    def _hand_on(self, entry: _Node, block: _Block, row: int, col: int,
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
                 image_grad: Callable[[Box, torch.Tensor], None] | None,
                 ) -> list[torch.Tensor | None]:
        """Tiles in reverse raster order; returns the parameter gradients. The halo strips
        kept from the forward are freed as soon as their tile (left) or tile row (top) is
        done, so memory falls as the backward proceeds; a second backward cannot run."""
        if self.keep and not self.saved_top:
            raise RuntimeError("this streamed feature map was back-propagated before: the "
                               "halo engine frees what it kept for the backward as it goes, "
                               "so run the forward again instead of retain_graph=True")
        program = self.program
        rows, cols = program.grid
        self._mark_needs_grad(params, image_grad is not None)
        result = program.result
        inp = next(e for e in program.nodes if e.kind == "input")
        param_grads = GradientSum(params)
        grad_next_top: dict[fx.Node, torch.Tensor] = {}
        done = 0
        self.expect(self._input_box(row, col) for row in reversed(range(rows))
                    for col in reversed(range(cols)))
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
                    crop = self.read((y0, y1, x0, x1)).detach().requires_grad_(
                        image_grad is not None)
                    outputs: list[torch.Tensor] = []
                    grads: list[torch.Tensor] = []

                    def collect(entry: _Node, block: _Block, row: int = row, col: int = col,
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
                    inputs = ([crop] if image_grad is not None else []) + \
                        [top[n] for n in leaves_top] + [left[n] for n in leaves_left] + params
                    keep = [i for i, o in enumerate(outputs) if o.requires_grad and o.numel()]
                    got: Sequence[torch.Tensor | None] = [None] * len(inputs)
                    if keep and inputs:
                        got = torch.autograd.grad([outputs[i] for i in keep],
                                                  inputs, [grads[i] for i in keep],
                                                  allow_unused=True)
                    got = list(got)
                    if image_grad is not None:
                        grad_crop = got.pop(0)
                        image_grad((y0, y1, x0, x1),
                                   torch.zeros_like(crop) if grad_crop is None else grad_crop)
                        del grad_crop
                    _take_halo_grads(got, leaves_top, grad_top, leaves_left, grad_left)
                    # this tile's values go before the next tile allocates its own
                    del got, out, outputs, grads, crop, top, left, collect, recipes
                    done += 1
                    self.report("backward", done)
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


def _exact_conv(entry: _Node, block: _Block, src: _Node, region: Box,
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
