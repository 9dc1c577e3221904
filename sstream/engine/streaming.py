"""StreamingCNN: run a local CNN tile by tile, forward and backward, with exact results.

The algorithm (Pinckaers et al., TPAMI 2020, with the window arithmetic of docs/design.md):

1. forward, without autograd: for every tile of the plan, run the stream on the tile's input
   crop and copy the kept part of its output into the full feature map (N, C', H', W');
2. the feature map enters the autograd graph as the output of `_StreamFunction`, so whatever
   comes after it (the head, the loss) is ordinary autograd;
3. backward: for every tile, re-run the crop with autograd, back-propagate the kept part with
   the matching slice of the feature-map gradient, and sum the parameter gradients over tiles.
   Every output position belongs to exactly one tile, so the sums equal the whole-image
   gradients. The crops' input gradients overlap; they are added up block by block, and each
   block is handed out (to `image.grad`, or to a sink) as soon as no later tile can touch it.

Only crops, one at a time, ever go through the stream: no activation of full-image size exists.
Steps 1 and 3 are the crop engine's run (crop_run.py); the halo engine (halo_schedule.py plans
it, halo_run.py runs it) does the same without recomputing the crops' margins. A `TileRunner`
holds one image's run of either engine behind one interface (`TileRun`).

With a head that starts with global pooling (`global_pool`, pooling.py), step 1 reduces each
output region into the pooled values (N, C') as it comes, and those enter the graph instead of
the feature map; step 3 re-runs only the blocks whose share of the feature-map gradient is not
zero (at most N x C' with max pooling), sized per image. Nothing of the feature map's size
exists then: the memory does not grow with the image's area. Attention pooling
(`attention_pool`, attention.py) does the same with an online softmax; its backward re-runs
every tile the mask needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from sstream.engine.attention import AttentionPool, AttentionRun, attention_weight_blocks
from sstream.engine.crop_run import CropRun, GradientWriter, OutputGradient
from sstream.engine.geometry import StreamGeometry, analyse, meta_call, training_flags
from sstream.engine.halo_run import HaloRun
from sstream.engine.halo_schedule import HaloProgram
from sstream.engine.pooling import GlobalPool, check_mode, sparse_plan
from sstream.engine.tile_io import TileIO, TileProgress, module_dtype
from sstream.engine.tiling import Box, OutputMask, Tile, TilePlan, make_plan, masked_tiles
from sstream.errors import InputError

InputGradSink = Callable[[Box, torch.Tensor], None]
"""Receives (box, gradient) for final blocks of the input gradient, box = (y0, y1, x0, x1) in
input pixels, gradient (N, C, y1 - y0, x1 - x0) on the compute device. The blocks partition the
image and come in raster order: one row of blocks after another, top to bottom, each row's
blocks left to right and together spanning the full width."""


ENGINES = ("auto", "halo", "crop")


def check_engine(engine: str) -> str:
    """`engine` if it names one of ENGINES, else a one-line ValueError listing them."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    return engine


@runtime_checkable
class ImageSource(Protocol):
    """A lazily read image: anything with a shape (N, C, H, W) and a `read(box)` method.

    `read((y0, y1, x0, x1))` returns the region as a tensor (N, C, y1 - y0, x1 - x0) in the
    dtype the stream expects. Regions are read again during the backward pass.

    Two optional methods, called when a source has them: `expect(boxes)`, before each pass,
    with the boxes the pass will read in order (tiles no wanted output needs are left out),
    so a source can decode ahead; and `prefer_device(device)`, once, with the device the
    stream runs on, so a source can hand its regions out there.
    """

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    def read(self, box: Box) -> torch.Tensor: ...


class TensorSource:
    """An in-memory image tensor (N, C, H, W) presented as an ImageSource."""

    def __init__(self, image: torch.Tensor) -> None:
        if image.dim() != 4:
            raise InputError(f"expected an image tensor (N, C, H, W), got shape "
                             f"{tuple(image.shape)}")
        self.image = image.detach()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    def read(self, box: Box) -> torch.Tensor:
        y0, y1, x0, x1 = box
        return self.image[:, :, y0:y1, x0:x1]


def _as_tuple(tile_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(tile_size, int):
        tile_size = (tile_size, tile_size)
    size = tuple(int(t) for t in tile_size)
    if len(size) != 2 or min(size) <= 0:
        raise InputError(f"tile_size must be a positive int or (height, width), got {tile_size}")
    return size  # type: ignore[return-value]


class StreamingCNN(nn.Module):
    """Wraps a stream of local ops so that calling it streams tiles, exactly.

    `scnn(image)` equals `stream(image)`, and backpropagating through it gives the stream's
    parameters (and `image`, if it requires grad) exactly the gradients plain autograd gives.

    Args:
        stream: the convolutional trunk; every op must be local (see docs/engine.md's table),
            otherwise UnsupportedModuleError names the offending module.
        tile_size: tile side in input pixels, int or (height, width), before the overlap the
            engine adds. Rounded up to a multiple of the output stride; see `self.tile_size`.
        engine: "auto" (halos carried between tiles where the stream allows it: every layer
            computes each output once; else crops with receptive-field margins), "crop"
            (crops always: no halo strips are kept between the forward and the backward,
            which needs less memory than the halo engine for small tiles on very large
            images; `estimate_training_memory` tells), or "halo" (insist: ValueError when
            the stream needs crops). Settable later as `self.engine`.
    """

    def __init__(self, stream: nn.Module, tile_size: int | Sequence[int],
                 engine: str = "auto") -> None:
        super().__init__()
        self.engine = check_engine(engine)
        self.stream = stream
        self.geometry: StreamGeometry = analyse(stream, in_eval_mode=True)
        requested = _as_tuple(tile_size)
        self.tile_size: tuple[int, int] = tuple(  # type: ignore[assignment]
            -(-t // s) * s for t, s in zip(requested, self.geometry.stride))
        self.on_tile: TileProgress | None = None  # set it to follow long images tile by tile
        self._analysed_flags: tuple[bool, ...] | None = None
        self._output_sizes: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._programs: dict[Any, HaloProgram | None] = {}

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"tile_size={self.tile_size}, output_stride={g.stride}, "
                f"receptive_field={g.receptive_field}")

    # -- planning ------------------------------------------------------------------------

    def output_size(self, input_shape: Sequence[int]) -> tuple[int, int]:
        """(H', W') of the stream's output for an input of shape (N, C, H, W) or (C, H, W)."""
        key = tuple(input_shape[-3:])
        if key not in self._output_sizes:
            self._output_sizes[key] = _meta_output_size(self.stream, key)
        return self._output_sizes[key]

    def plan(self, input_shape: Sequence[int], tile_size: tuple[int, int] | None = None
             ) -> TilePlan:
        """The tile plan for an input of shape (N, C, H, W), with `self.tile_size` or another
        tile (height, width) in input pixels, a multiple of the output stride."""
        height, width = int(input_shape[-2]), int(input_shape[-1])
        return make_plan(self.geometry, (height, width), self.output_size(input_shape),
                         tile_size or self.tile_size, self.minimum_size(input_shape))

    def minimum_size(self, input_shape: Sequence[int]) -> tuple[int, int]:
        """The shortest input height and width the stream accepts, found on the meta device
        by bisection below this (accepted) input's size. Local ops size each axis on its
        own, so the answer does not depend on the input's size: cached per channel count."""
        channels, height, width = (int(s) for s in input_shape[-3:])
        key = ("minimum", channels)
        if key in self._output_sizes:
            return self._output_sizes[key]

        def accepts(h: int, w: int) -> bool:
            try:
                return min(self.output_size((channels, h, w))) > 0
            except RuntimeError:
                return False

        found = (_smallest(lambda h: accepts(h, width), height),
                 _smallest(lambda w: accepts(height, w), width))
        if accepts(height, width):  # else the search had no valid upper bound: don't keep it
            self._output_sizes[key] = found
        return found

    # -- running -------------------------------------------------------------------------

    def forward(self, image: torch.Tensor | ImageSource,
                input_grad_sink: InputGradSink | None = None) -> torch.Tensor:
        """Stream `image` (a tensor (N, C, H, W) or an ImageSource) through the stream.

        With `input_grad_sink`, the backward pass hands the input gradient to the sink in
        final blocks, in raster order (see `InputGradSink`), instead of (or besides)
        `image.grad`.
        """
        self._refuse_current_modes()
        source = _as_source(image)
        plan = self.plan(source.shape)
        params = [p for p in self.stream.parameters() if p.requires_grad]
        image_anchor = image if isinstance(image, torch.Tensor) else _NO_TENSOR
        sink_anchor = torch.empty(0, requires_grad=input_grad_sink is not None)
        wants_graph = bool(params) or image_anchor.requires_grad or input_grad_sink is not None
        wants_graph = wants_graph and torch.is_grad_enabled()
        # the sink wants input-gradient blocks top to bottom: the halo backward goes bottom-up
        program = None if input_grad_sink is not None else self._halo_program(
            source.shape, plan, training=wants_graph)
        run = TileRunner(self.stream, plan, source, input_grad_sink, self.on_tile, program,
                         keep_halos=wants_graph)
        if not wants_graph:
            return run.forward()
        return _StreamFunction.apply(run, image_anchor, sink_anchor, *params)

    def global_pool(self, image: torch.Tensor | ImageSource, mode: str = "max",
                    mask: torch.Tensor | None = None,
                    input_grad_sink: InputGradSink | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global max or average pooling of the stream's output, never assembling it.

        Each tile's output is reduced as it comes (pooling.py), so a gigapixel slide needs no
        feature-map-sized memory: the forward keeps line buffers as wide as the slide
        (halo engine) or one crop (crop engine). Returns (values (N, C'), indices (N, C') of
        the maxima in the flattened H' x W' output, or None for "avg"); maxima tie to the
        first position in row-major order, as `adaptive_max_pool2d` does.

        Differentiable: with grad enabled and trainable parameters (or an image tensor that
        requires grad, or `input_grad_sink`), `values` carries autograd and its backward
        gives exactly the gradients of pooling the whole feature map. The backward re-runs
        only the output blocks its gradient reaches (the crop engine; with max pooling at
        most N x C' blocks, sized per image to re-run the fewest pixels) and reads nothing
        else. `input_grad_sink` receives the input gradient in final blocks, in raster order
        (see `InputGradSink`), as in `forward`.

        `mask`: bool (H', W') or (N, H', W') at the output's resolution; pooling then runs
        over True positions only (max as if the others were -inf, avg over the True ones),
        and tiles no True output depends on are never read, computed or re-run. ValueError
        for a mask of another shape or one that selects nothing (for some batch element).
        """
        check_mode(mode)
        run, output_mask = self._pooling_runner(image, mask, input_grad_sink)
        pooled = _PooledRun(run, GlobalPool(mode, run.plan.output_size, output_mask),
                            functools.partial(self.plan, run.source.shape),
                            self.geometry.stride)
        return self._recorded(pooled, image, input_grad_sink), pooled.pool.indices

    def attention_pool(self, image: torch.Tensor | ImageSource, attention: nn.Module,
                       mask: torch.Tensor | None = None,
                       input_grad_sink: InputGradSink | None = None) -> torch.Tensor:
        """Attention pooling of the stream's output (attention.py), never assembling it.

        `attention` maps a block of the output (N, C', h, w) to logits (N, K, h, w), position
        by position (1x1 convolutions; no neighbours); returns pooled (N, K, C'): per head k
        the softmax over positions of the logits, weighing the feature vectors. The forward
        is an online softmax over the tiles (running maximum, rescaled sums).

        Differentiable as `global_pool`, with the attention's parameters too: the backward
        re-runs every tile the mask needs (the crop engine) and gives exactly the gradients
        of pooling the whole feature map. `mask` as in `global_pool`; ValueError for logits
        of the wrong shape.
        """
        run, output_mask = self._pooling_runner(image, mask, input_grad_sink)
        pooled = AttentionRun(run, AttentionPool(attention, output_mask))
        return self._recorded(pooled, image, input_grad_sink, attention.parameters())

    def attention_weights(self, image: torch.Tensor | ImageSource, attention: nn.Module,
                          mask: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, Iterator[tuple[Box, torch.Tensor]]]:
        """`attention_pool`'s pooled (N, K, C') without grad, and its softmax weights block
        by block: (output box, weights (N, K, h, w)), the boxes in raster order. Two passes
        over the image (the first, made here, finds the normaliser; the second as the
        blocks are taken); nothing of the output's size is held. Blocks the mask leaves out
        are not given: their weights are 0."""
        first, output_mask = self._pooling_runner(image, mask, None)
        pool = AttentionPool(attention, output_mask)
        with torch.no_grad():
            pooled = AttentionRun(first, pool).forward()
        second, _ = self._pooling_runner(image, mask, None)
        return pooled, attention_weight_blocks(second, pool)

    def output_regions(self, image: torch.Tensor | ImageSource,
                       mask: torch.Tensor | None = None,
                       ) -> Iterator[tuple[Box, torch.Tensor]]:
        """The stream's output region by region, without grad: (output box, region
        (N, C', h, w)), raster order, the boxes partitioning the output (regions the `mask`
        needs no output of are left out). For per-position maps of any size."""
        run, output_mask = self._pooling_runner(image, mask, None)
        with torch.no_grad():
            yield from run.output_regions(output_mask)

    def _pooling_runner(self, image: torch.Tensor | ImageSource, mask: torch.Tensor | None,
                        sink: InputGradSink | None) -> tuple[TileRunner, OutputMask | None]:
        """The tile runner of a pooling call (halo forward where it can, crop backward) and
        its output mask (ValueError for a mask that does not fit)."""
        self._refuse_current_modes()
        source = _as_source(image)
        plan = self.plan(source.shape)
        output_mask = None if mask is None else OutputMask(mask, plan.output_size,
                                                           source.shape[0])
        program = self._halo_program(source.shape, plan, training=False)
        return TileRunner(self.stream, plan, source, sink, self.on_tile, program), output_mask

    def _recorded(self, pooled: _PooledRun | AttentionRun, image: torch.Tensor | ImageSource,
                  sink: InputGradSink | None, more_params: Iterable[nn.Parameter] = (),
                  ) -> torch.Tensor:
        """`pooled.forward()`, entered into the autograd graph when anything wants a
        gradient: a trainable parameter, the image tensor, or the sink."""
        params = [p for p in [*self.stream.parameters(), *more_params] if p.requires_grad]
        image_anchor = image if isinstance(image, torch.Tensor) else _NO_TENSOR
        sink_anchor = torch.empty(0, requires_grad=sink is not None)
        wants_graph = bool(params) or image_anchor.requires_grad or sink is not None
        if wants_graph and torch.is_grad_enabled():
            return _StreamFunction.apply(pooled, image_anchor, sink_anchor, *params)
        return pooled.forward()

    def input_gradient(self, image: torch.Tensor | ImageSource,
                       grad_output: torch.Tensor | OutputGradient, sink: InputGradSink) -> None:
        """Back-propagate `grad_output` (shaped like the stream's output) to the input only.

        The input gradient goes to `sink` in final blocks, in raster order; no parameter
        gradients are formed. `grad_output` may also be a function of an output box giving
        that block's gradient, or None where it is zero: such tiles are not re-run at all.
        (After global pooling, `global_pool(..., input_grad_sink=sink)` does this for the
        pooled gradient by itself.)
        """
        self._refuse_current_modes()
        source = _as_source(image)
        run = TileRunner(self.stream, self.plan(source.shape), source, sink, self.on_tile)
        run.crop_backward(grad_output, None, [])

    def engine_for(self, input_shape: Sequence[int]) -> str:
        """"halo" or "crop": the engine that streams an input of shape (N, C, H, W) (calls
        with an `input_grad_sink` always use crops: the sink wants blocks top to bottom)."""
        return "crop" if self.halo_program(input_shape) is None else "halo"

    def saved_halo_elements(self, input_shape: Sequence[int]) -> int:
        """Elements (of the stream's dtype) the halo engine keeps between the forward and the
        backward pass for an input of shape (N, C, H, W): thin strips along every tile edge
        of every layer that needs them; 0 when the crop engine runs this shape."""
        program = self.halo_program(input_shape)
        return 0 if program is None else program.saved_halo_elements()

    def halo_program(self, input_shape: Sequence[int], training: bool = True
                     ) -> HaloProgram | None:
        """The halo engine's schedule for an input of shape (N, C, H, W) in a training step
        (or a forward pass only), planned once per shape; None when the crop engine runs
        this shape."""
        self._refuse_current_modes()
        return self._halo_program(input_shape, self.plan(input_shape), training)

    def planned(self, input_shape: Sequence[int]) -> bool:
        """Whether an image of `input_shape` has been through a pooled forward already, so
        that its plan, output size and halo program are known: asking for them then runs
        nothing on the stream. (Working them out runs the stream on the meta device and
        traces it, which must not happen on another thread beside a running forward.)"""
        known = tuple(input_shape[-3:]) in self._output_sizes
        if self.engine == "crop":
            return known
        return known and (tuple(input_shape), self._analysed_flags, False) in self._programs

    def pooled_reads(self, input_shape: Sequence[int], mask: torch.Tensor | None = None
                     ) -> list[Box] | None:
        """The input regions a pooled forward (`global_pool`, `attention_pool`) of an image
        of `input_shape` reads, in order, so that a source can start reading an image before
        its forward does; None unless `planned(input_shape)`."""
        if not self.planned(input_shape):
            return None
        plan = self.plan(input_shape)
        output_mask = None if mask is None else OutputMask(mask, plan.output_size,
                                                           input_shape[0])
        if self.engine != "crop":
            program = self._programs[(tuple(input_shape), self._analysed_flags, False)]
            if program is not None:
                return program.input_boxes(None if output_mask is None
                                           else program.tiles_needed(output_mask))
        return [tile.in_box for tile in masked_tiles(plan, output_mask)]

    def _halo_program(self, shape: Sequence[int], plan: TilePlan, training: bool
                      ) -> HaloProgram | None:
        """The halo engine's program for this input shape, or None: use the crop engine."""
        if self.engine == "crop":
            return None
        key = (tuple(shape), self._analysed_flags, training)
        if key not in self._programs:
            rows = _input_edges(len(plan.rows), plan.input_size[0])
            cols = _input_edges(len(plan.cols), plan.input_size[1])
            self._programs[key] = HaloProgram.build(self.stream, shape, rows, cols, training)
        if self.engine == "halo" and self._programs[key] is None:
            raise InputError("engine='halo' cannot run this stream exactly; use 'auto'")
        return self._programs[key]

    def _refuse_current_modes(self) -> None:
        """Re-check locality when train/eval flags changed (BatchNorm, dropout in training)."""
        flags = training_flags(self.stream)
        if flags != self._analysed_flags:
            analyse(self.stream)
            self._analysed_flags = flags


_NO_TENSOR = torch.empty(0)


def _as_source(image: torch.Tensor | ImageSource) -> ImageSource:
    """The image as an ImageSource (a tensor is wrapped); TypeError for anything else."""
    source = TensorSource(image) if isinstance(image, torch.Tensor) else image
    if not isinstance(source, ImageSource):
        raise TypeError("image must be a tensor (N, C, H, W) or an ImageSource")
    return source


def _smallest(accepts: Callable[[int], bool], largest: int) -> int:
    """The smallest n in [1, largest] with accepts(n), assuming monotonicity (largest if
    none is smaller)."""
    low, high = 1, largest
    while low < high:
        middle = (low + high) // 2
        if accepts(middle):
            high = middle
        else:
            low = middle + 1
    return high


def _input_edges(count: int, length: int) -> list[int]:
    """Input tile edges of the halo engine: `count` (the plan's tiles along this axis, so that
    both engines run as many tiles) nearly equal tiles over `length` input pixels."""
    return [k * length // count for k in range(count + 1)]


def _meta_output_size(stream: nn.Module, chw: tuple[int, ...]) -> tuple[int, int]:
    """Run the stream on the meta device (no memory, no compute) to get its output size."""
    out = meta_call(stream, torch.empty((1, *chw), device="meta", dtype=module_dtype(stream)))
    return int(out.shape[-2]), int(out.shape[-1])


class TileRun(Protocol):
    """One image's tiles run by one engine: `CropRun` (crop_run.py) or `HaloRun` (halo_run.py).

    Each pass announces the input regions it will read, in order, before it reads them
    (`TileIO.expect`), and reports progress tile by tile.
    """

    def forward(self) -> torch.Tensor:
        """The stream's whole output (N, C', H', W'), without grad."""
        ...

    def output_regions(self, mask: OutputMask | None = None
                       ) -> Iterator[tuple[Box, torch.Tensor]]:
        """(output box, output region) without grad, in raster order, the boxes partitioning
        the output; with `mask`, tiles no masked output depends on are not read or run."""
        ...

    def backward(self, grad_fmap: torch.Tensor, params: list[torch.Tensor],
                 write: GradientWriter | None) -> list[torch.Tensor | None]:
        """The parameter gradients for the output gradient `grad_fmap` (N, C', H', W'); the
        input gradient goes to `write` in final blocks, if given."""
        ...


class TileRunner:
    """One image's tile plan, forward (no grad) and backward, for one call of StreamingCNN.

    `tiles` is the run of the engine chosen for this image (a HaloRun given a `program`, else
    a CropRun); `crops` the crop engine's, which pooled backwards use whichever engine ran the
    forward (they re-run only the tiles their gradient reaches). `io` reads the source and
    reports progress for both; final input-gradient blocks go to `sink` and/or the image's
    gradient.
    """

    def __init__(self, stream: nn.Module, plan: TilePlan, source: ImageSource,
                 sink: InputGradSink | None, on_tile: TileProgress | None,
                 program: HaloProgram | None = None, keep_halos: bool = False) -> None:
        self.plan, self.source, self.sink = plan, source, sink
        self.io = TileIO(stream, source, len(plan), on_tile)
        self.autocast = self.io.autocast  # the forward's, for the backward's re-runs
        self.crops = CropRun(stream, plan, self.io)
        self.tiles: TileRun = self.crops if program is None else HaloRun(
            program, stream, self.io, keep_halos)

    def forward(self) -> torch.Tensor:
        """The stream's whole output (N, C', H', W'), without grad."""
        return self.tiles.forward()

    def output_regions(self, mask: OutputMask | None = None
                       ) -> Iterator[tuple[Box, torch.Tensor]]:
        """(output box, the stream's output there) without grad, in raster order; the boxes
        partition the output. With `mask`, tiles that no masked output depends on are
        skipped (neither read nor computed). Progress is reported once the consumer has
        taken a tile."""
        return self.tiles.output_regions(mask)

    def backward(self, grad_fmap: torch.Tensor, image_grad: torch.Tensor | None,
                 params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Accumulate parameter gradients (returned) and input gradients (to the blocks)."""
        return self.tiles.backward(grad_fmap, params, self._gradient_writer(image_grad))

    def crop_backward(self, grad_fmap: torch.Tensor | OutputGradient,
                      image_grad: torch.Tensor | None, params: list[torch.Tensor],
                      plan: TilePlan | None = None, tiles: Sequence[Tile] | None = None,
                      ) -> list[torch.Tensor | None]:
        """The crop engine's backward (`CropRun.backward`), the input gradient to the sink
        and/or `image_grad`: every tile of `plan` (default: the forward's) whose output
        gradient is not zero re-runs its crop with autograd; `tiles` restricts it to those."""
        return self.crops.backward(grad_fmap, params, self._gradient_writer(image_grad),
                                   plan, tiles)

    def _gradient_writer(self, image_grad: torch.Tensor | None) -> GradientWriter | None:
        """Where final input-gradient blocks go: the sink and/or `image_grad` (None: nowhere,
        no input gradient is formed)."""
        if image_grad is None and self.sink is None:
            return None

        def receive(box: Box, grad: torch.Tensor) -> None:
            if self.sink is not None:
                self.sink(box, grad)
            if image_grad is not None:
                y0, y1, x0, x1 = box
                image_grad[..., y0:y1, x0:x1] = grad.to(image_grad.device)
        return receive


class _StreamFunction(torch.autograd.Function):
    """Puts what a streamed run computes into the autograd graph: the feature map
    (`TileRunner`) or the pooled values (`_PooledRun`, `AttentionRun`); backward streams
    the tiles."""

    @staticmethod
    def forward(ctx: Any, run: TileRunner | _PooledRun | AttentionRun, image: torch.Tensor,
                sink_anchor: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.params = run, params
        ctx.image_meta = (image.dtype, image.device, image.shape)
        return run.forward()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        image_grad = None
        if ctx.needs_input_grad[1]:
            dtype, device, shape = ctx.image_meta
            image_grad = torch.empty(shape, dtype=dtype, device=device)
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[3:]) if needed]
        grads = ctx.run.backward(grad, image_grad, [ctx.params[i] for i in wanted])
        param_grads: list[torch.Tensor | None] = [None] * len(ctx.needs_input_grad[3:])
        for i, param_grad in zip(wanted, grads):
            param_grads[i] = param_grad
        return (None, image_grad, None, *param_grads)


class _PooledRun:
    """One image's global pooling (`StreamingCNN.global_pool`): the forward reduces the
    output regions as they come; the backward re-runs only the blocks the gradient reaches."""

    def __init__(self, run: TileRunner, pool: GlobalPool,
                 plan_for: Callable[[tuple[int, int]], TilePlan], stride: tuple[int, int],
                 ) -> None:
        self.run, self.pool, self.plan_for, self.stride = run, pool, plan_for, stride

    def forward(self) -> torch.Tensor:
        """The pooled values (N, C'), computed without grad."""
        for box, region in self.run.output_regions(self.pool.mask):
            self.pool.add(box, region)
        return self.pool.values

    def backward(self, grad: torch.Tensor, image_grad: torch.Tensor | None,
                 params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Parameter gradients (and the input's, to `image_grad` / the sink) for the pooled
        gradient `grad` (N, C'). Only parameters wanted: the blocks holding a maximum, sized
        per image (`sparse_plan`), or the masked tiles; an input gradient is handed out
        block by block in raster order, so its tiles are the forward's plan."""
        gradient = self.pool.gradient(grad)
        run = self.run
        if image_grad is not None or run.sink is not None:
            return run.crop_backward(gradient, image_grad, params)
        positions = gradient.positions()
        if positions is None:
            tiles = masked_tiles(run.plan, self.pool.mask)
            return run.crop_backward(gradient, None, params, run.plan, tiles)
        plan, tiles = sparse_plan(self.plan_for, run.plan.tile_size, self.stride, positions)
        return run.crop_backward(gradient, None, params, plan, tiles)
