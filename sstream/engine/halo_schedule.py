"""The halo engine's schedule: which part of every layer's output each tile computes.

The crop approach (crop_run.py) recomputes a receptive-field-wide margin around every tile.
The halo engine (this schedule, run by halo_run.py) processes tiles in raster order, and every
node of the stream's fx graph keeps the boundary rows and columns of its output (its *halo*)
that the next tiles' consumers still need, as line-buffer image pipelines do. Per axis, input
tile k makes the first `A_v[k+1]` outputs of node v computable (the schedule): for a
sliding-window node (extent e, stride s, left padding p) over input u,

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
own padding (`HaloNode.input_start`; in deep layers, whose regions are a few outputs wide, the
dropped outputs were a third of the work).

A node keeps `up` rows (a full-width line buffer for the next tile row) and `left` columns
(for the next tile) of its output: as many as its consumers' regions read from earlier tiles.
Values that are cheap to recompute are marked so (`_mark_recomputed`): the backward recomputes
them instead of keeping them.

Graphs this engine cannot run exactly (in-place ops on values that have other readers,
operands of different spatial sizes, padding as large as a kernel's extent, whose outputs see
only padding) are detected when the program is built (`HaloProgram.build` gives None);
StreamingCNN then falls back to the crop engine.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
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
from sstream.engine.tiling import Box, OutputMask

_WINDOW_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
}
# methods whose result may be the very tensor they are called on
_ALIASING_METHODS = {"contiguous", "float", "double", "half", "bfloat16", "detach"}


@dataclass
class HaloNode:
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


def _thin_halo(entry: HaloNode) -> bool:
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

    def __init__(self, nodes: list[HaloNode], edges: tuple[list[int], list[int]],
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
        nodes: list[HaloNode] = []
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
              shapes: dict[fx.Node, Any]) -> HaloNode | None:
    if node.op == "output":
        return HaloNode(node, "output", sources=(node.args[0],))
    dims = spatial_dims(values.get(node))
    if dims is None:
        return HaloNode(node, "constant")
    shape = shapes[node]
    size = (int(shape[dims[0]]), int(shape[dims[1]]))
    per_pixel = math.prod(int(d) for i, d in enumerate(shape) if i not in dims)
    entry = _classify_spatial(node, root, values, shapes, dims, size)
    if entry is not None:
        entry.per_pixel = per_pixel
    return entry


def _classify_spatial(node: fx.Node, root: nn.Module, values: dict[fx.Node, Any],
                      shapes: dict[fx.Node, Any], dims: tuple[int, int],
                      size: tuple[int, int]) -> HaloNode | None:
    if node.op == "placeholder":
        return HaloNode(node, "input", dims, size)
    sources = tuple(dict.fromkeys(n for n in node.all_input_nodes
                                  if spatial_dims(values.get(n)) is not None))
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if isinstance(module, _WINDOW_MODULES):
            axes = conv_axes(module) if isinstance(module, nn.Conv2d) else pool_axes(module)
            if any(max(before, after) >= extent for extent, _, before, after in axes):
                return None  # outputs that see only padding: the crop engine handles them
            return HaloNode(node, "window", dims, size, sources, module,
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
    return HaloNode(node, "pointwise", dims, size, sources, call=call,
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


def _mark_recomputed(nodes: list[HaloNode], result: HaloNode) -> bool:
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


def _largest_region(entry: HaloNode) -> int:
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
                    env[node] = run_node(node, self.stream, env)
                if isinstance(env[node], torch.Tensor):
                    shapes[node] = tuple(env[node].shape)

    dtype = next((p.dtype for p in stream.parameters()), torch.get_default_dtype())
    meta_call(_Recorder(), torch.empty(input_shape, device="meta", dtype=dtype))
    return shapes


def run_node(node: fx.Node, root: nn.Module, env: dict[fx.Node, Any]) -> Any:
    """`node` computed as the graph says, its operands taken from `env` (node -> value)."""
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
