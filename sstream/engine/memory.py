"""Predicted peak memory of one training step, conventional vs streaming, without running it.

Everything is traced on the `meta` device: tensors there have shapes and dtypes but no data,
so a ResNet forward and backward on a 65536 x 65536 image costs milliseconds and no memory.
Two instruments watch the trace:

- a TorchDispatchMode that sees every tensor an operator creates and, through a weak reference
  to its storage, when the storage dies: the live bytes over time, as a caching-free allocator
  would count them (CUDA's `max_memory_allocated`, modulo its 512-byte rounding);
- `saved_tensors_hooks`, which see what autograd keeps for the backward pass (distinct
  storages, so views and in-place ops are not counted twice): the "activations" column.

One training step (`optimizer.zero_grad(set_to_none=True)`, forward, loss, backward,
`optimizer.step()`) then goes through phases, and its peak is the largest phase:

    always alive    parameters (W) + optimizer state (AdamW 2 W, SGD with momentum 1 W)
    conventional    image + live peak of forward + loss + backward of stream and head on the
                    whole image (saved activations, gradients of activations, parameter grads)
    streaming       feature map F (N, C', H', W') for the whole step, and
      forward         + live peak of one crop through the stream without grad
      head            + live peak of head forward + loss + backward (grad of F, head grads)
      backward        + grad of F + head grads + accumulated stream grads
                      + the previous tile's stream grads (StreamingCNN's loop still holds
                        them while it re-runs the next crop)
                      + live peak of one crop re-run with grad and back-propagated
    step            W + gradients + optimizer state + step temporaries (AdamW: one W, the
                    multi-tensor sqrt buffer of CUDA's default implementation)

Where the head starts with global pooling (`whole_slide`, as training then runs), no feature
map exists (`StreamingCNN.global_pool`), and a step has two phases beyond the model state:

    forward         the pooling forward without grad: one crop (crop engine), or the halo
                    engine's line buffers and one tile's values (traced on a proxy of at
                    most PROXY_TILES x PROXY_TILES tiles; the line buffers, two of them alive
                    while one tile row hands on to the next, grown to the full width)
    backward        + one crop re-run with grad and back-propagated (the tile plan's largest:
                      the blocks re-run are never larger) and its output block's gradient
                    + head grads + accumulated stream grads + the previous crop's

Neither grows with the image's height, and only the line buffers with its width. With max
pooling the crops re-run may be smaller than the tile's (`sparse_plan`): the row is then an
upper bound.

That is the crop engine. The halo engine (StreamingCNN's choice wherever the stream allows
it) keeps thin strips of every layer between tiles, line buffers and recipes, too intricate
to model by phases: its step is traced by running the engine itself, StreamingCNN on a meta
copy of the stream, on an image of at most PROXY_TILES x PROXY_TILES of the plan's tiles,
and what grows with the image beyond that (the halo strips kept for the backward, two
gradient line buffers, the feature map and its gradient) is added exactly (`_halo_row`).
Against steps measured on the CPU the prediction is equal when the whole grid is traced and
1-18% high when a proxy grid is (ResNet-18 at 2048 px, tiles 256 to 1024: 1-4%).

The crop traced is the plan's largest crop (`StreamingCNN(stream, tile).plan(shape)
.largest_crop`); the input image of a streaming run is read lazily per crop (an ImageSource),
so only the crop counts (the halo trace reads each region as a new tensor likewise). Mixed
precision (dtype float16/bfloat16): activations in dtype, parameters, gradients and optimizer
state in float32, plus a dtype copy of the weights (autocast's cast cache). Modules are
traced in eval mode (frozen BatchNorm, as streaming requires; dropout off).

Compute overhead of streaming: the stream's forward runs on overlapping crops twice (forward,
and again in the backward) and its backward once (about 2x a forward), so with f = sum of crop
areas / image area and F_s, F_h the forward FLOPs of stream and head on the whole image,

    overhead = (4 f F_s + 3 F_h) / (3 F_s + 3 F_h)

with f = 1 for the halo engine (each output once per pass; the convolutions that read the
image run once more in its backward, not counted).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from sstream.engine.geometry import eval_mode, meta_shortcut
from sstream.engine.halo_schedule import HaloProgram
from sstream.engine.pooling import head_global_pool
from sstream.engine.saving import storage_key
from sstream.engine.streaming import StreamingCNN, check_engine
from sstream.engine.tiling import TilePlan
from sstream.errors import InputError

__all__ = ["OPTIMIZERS", "MemoryEstimate", "MemoryRow", "estimate_training_memory",
           "largest_fitting_row"]

OPTIMIZERS: dict[str, tuple[int, int]] = {
    # name: (state tensors per parameter, parameter-sized temporaries during step())
    "adamw": (2, 1),
    "sgd": (1, 0),  # with momentum
}
# the halo engine is traced on at most this many tiles per axis (`_halo_row`)
PROXY_TILES = 4
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MemoryRow:
    """Predicted memory of one training step, in bytes.

    The components overlap in time in different ways; `peak_bytes` is the largest phase (see
    the module docstring), not their sum.

    Attributes:
        mode: "conventional" or "streaming".
        tile_size: the tile (height, width) in input pixels after rounding up to the output
            stride; None for conventional.
        parameters_bytes, gradients_bytes, optimizer_bytes: model state (float32).
        activations_bytes: tensors autograd keeps for backward: whole model on the whole
            image (conventional), one crop through the stream plus the head (crop engine),
            or the halo strips kept from the forward plus the head (halo engine).
        feature_map_bytes: the streamed feature map plus its gradient (0 for conventional).
        tile_peak_bytes: live bytes inside one crop's backward re-run (crop engine), or at
            the step's peak beyond the kept strips, feature map and its gradient: a tile's
            re-run, line buffers, gradient sums (halo engine); 0 for conventional.
        peak_bytes: the predicted peak of the step.
        num_tiles: tiles in the plan (1 for conventional).
        largest_crop: (height, width) of the largest crop a tile runs; None for conventional
            and for the halo engine (its tiles run no overlapping crops).
        compute_overhead: training FLOPs relative to conventional (1.0 for conventional).
        saving: 1 - peak / conventional peak (0.0 for conventional).
        engine: the streaming engine modelled, "crop" or "halo"; None for conventional.
            On the whole-slide path it is the forward's (the backward re-runs crops).
        path: "feature map" (the streamed feature map and its gradient are kept) or
            "whole-slide" (pooled tile by tile: `StreamingCNN.global_pool`); None for
            conventional.
    """

    mode: str
    tile_size: tuple[int, int] | None
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    feature_map_bytes: int
    tile_peak_bytes: int
    peak_bytes: int
    num_tiles: int = 1
    largest_crop: tuple[int, int] | None = None
    compute_overhead: float = 1.0
    saving: float = 0.0
    engine: str | None = None
    path: str | None = None


@dataclass
class MemoryEstimate:
    """Rows for one image size: conventional first, then one per tile size (ascending)."""

    image_size: tuple[int, int]
    batch: int
    channels: int
    dtype: str
    optimizer: str
    feature_map_shape: tuple[int, int, int, int]
    rows: list[MemoryRow] = field(default_factory=list)

    @property
    def conventional(self) -> MemoryRow:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Instruments


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive; their peak.

    Storages of `external` tensors (parameters, inputs made beforehand) are not counted. A
    storage is counted once, however many views or in-place results share it, and leaves the
    count when its weak reference dies.
    """

    def __init__(self, external: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.external = {storage_key(t) for t in external}
        self.sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = meta_shortcut(func, args)
        if out is None:
            out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._count(item)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes or key in self.external:
            return
        self.sizes[key] = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._release(key))
        self.current += self.sizes[key]
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self._refs.pop(key, None)


class _SavedBytes:
    """Distinct storages autograd saves for backward (outside `external`), in bytes."""

    def __init__(self, external: Iterable[torch.Tensor] = ()) -> None:
        self.external = {storage_key(t) for t in external}
        self.sizes: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self.external and tensor.device.type == "meta":
            self.sizes[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self) -> _SavedBytes:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


@dataclass
class _Trace:
    peak: int  # live bytes above the start
    saved: int  # bytes saved for backward
    flops: int = 0


# --------------------------------------------------------------------------------------------
# Meta copies of a module


@dataclass
class _MetaModule:
    """A copy of a module on the meta device (see `_meta_copy`)."""

    module: nn.Module
    params: list[torch.Tensor]  # the trainable ones (requires_grad)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Parameters and buffers: there before a step, not counted in its live bytes."""
        return [*self.module.parameters(), *self.module.buffers()]

    def grads_bytes(self, itemsize: int) -> int:
        return sum(p.numel() for p in self.params) * itemsize

    def grad_fix(self, itemsize: int) -> int:
        """Gradient bytes a trace in `itemsize` misses: gradients are float32 anyway."""
        return self.grads_bytes(4 - itemsize)

    def fresh_grads(self) -> None:
        for p in self.params:
            p.grad = None


def _meta_copy(module: nn.Module, dtype: torch.dtype) -> _MetaModule:
    """The module deep-copied with meta parameters and buffers (floating ones in `dtype`):
    no data is copied, and the streaming engines can run the copy as they run the module."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty(b.shape, device="meta",
                                  dtype=dtype if b.is_floating_point() else b.dtype)
    copied = copy.deepcopy(module, memo)
    return _MetaModule(copied, [p for p in copied.parameters() if p.requires_grad])


def _param_numel(module: nn.Module, trainable_only: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# Traces


def _loss(logits: torch.Tensor) -> torch.Tensor:
    target = torch.zeros(logits.shape[0], dtype=torch.long, device="meta")
    return nn.functional.cross_entropy(logits.float(), target)


def _trace(run: Callable[[], None], external: Sequence[torch.Tensor]) -> _Trace:
    live, saved = LiveBytes(external), _SavedBytes(external)
    with live, saved:
        run()
    return _Trace(peak=live.peak, saved=saved.total)


def _forward_flops(model: _MetaModule, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = model(x)
    return counter.get_total_flops(), out


def _conventional_trace(stream: _MetaModule, head: _MetaModule, image: torch.Tensor) -> _Trace:
    def step() -> None:
        _loss(head(stream(image))).backward()

    external = [image, *stream.tensors, *head.tensors]
    trace = _trace(step, external)
    stream.fresh_grads()
    head.fresh_grads()
    return trace


def _head_trace(head: _MetaModule, fmap: torch.Tensor) -> _Trace:
    leaf = fmap.detach().requires_grad_(True)

    def step() -> None:
        _loss(head(leaf)).backward()

    trace = _trace(step, [leaf, *head.tensors])
    head.fresh_grads()
    return trace


def _tile_forward_trace(stream: _MetaModule, crop_shape: tuple[int, ...],
                        dtype: torch.dtype) -> _Trace:
    def forward() -> None:
        with torch.no_grad():
            stream(torch.empty(crop_shape, dtype=dtype, device="meta"))

    return _trace(forward, stream.tensors)


def _tile_backward_trace(stream: _MetaModule, crop_shape: tuple[int, ...], dtype: torch.dtype,
                         grad_fmap: torch.Tensor) -> _Trace:
    """One tile of StreamingCNN's backward: re-run the crop with grad, back-propagate."""

    def rerun() -> None:
        crop = torch.empty(crop_shape, dtype=dtype, device="meta")
        with torch.enable_grad():
            out = stream(crop)  # (N, C', h', w'); the kept part is at most all of it
        rows = min(out.shape[-2], grad_fmap.shape[-2])
        cols = min(out.shape[-1], grad_fmap.shape[-1])
        kept = out[..., :rows, :cols]  # as the engine's keep_box slice (its backward allocates)
        grad_kept = grad_fmap[..., :rows, :cols]  # a view of the feature-map gradient
        if stream.params:
            torch.autograd.grad(kept, stream.params, grad_kept, allow_unused=True)

    return _trace(rerun, [grad_fmap, *stream.tensors])


# --------------------------------------------------------------------------------------------
# The estimate


def estimate_training_memory(
    stream: nn.Module,
    head: nn.Module,
    image_size: tuple[int, int],
    tile_sizes: Sequence[int | tuple[int, int]] = (),
    dtype: torch.dtype | str = torch.float32,
    optimizer: str = "adamw",
    channels: int = 3,
    batch: int = 1,
    engine: str = "auto",
    whole_slide: bool = True,
) -> MemoryEstimate:
    """Predict the peak memory of one training step, conventional and streaming per tile.

    Args:
        stream: the streamed trunk (what StreamingCNN wraps). Not modified.
        head: what follows the stream, ending in logits (N, classes). Not modified.
        image_size: (height, width) of the input in pixels.
        tile_sizes: tile sides (int or (height, width)) in input pixels for streaming rows.
        dtype: activation dtype, torch.dtype or "float32" / "float16" / "bfloat16" (the last
            two: mixed precision, float32 parameters, gradients and optimizer state).
        optimizer: "adamw" or "sgd" (with momentum).
        channels, batch: input channels and images per step.
        engine: StreamingCNN's `engine` to model: "auto" (the halo engine where the stream
            allows it, as StreamingCNN chooses), "crop" or "halo".
        whole_slide: model the whole-slide path where the head starts with global pooling,
            as training runs it (False: the feature-map path).

    Returns:
        A MemoryEstimate: a conventional row, then one streaming row per tile size, ascending.

    Raises:
        ValueError: unknown optimizer or dtype, non-positive sizes, a tile larger than the
            image, or an image too small for the model.
        UnsupportedModuleError: the stream cannot be streamed (from StreamingCNN).
    """
    dtype = _as_dtype(dtype)
    check_engine(engine)
    if optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0 or batch <= 0 or channels <= 0:
        raise InputError(f"image size, batch and channels must be positive, got {image_size}, "
                         f"{batch}, {channels}")
    tiles = sorted({_tile_pair(t) for t in tile_sizes})
    for tile in tiles:
        if tile[0] > height or tile[1] > width:
            raise InputError(f"tile {tile[1]}x{tile[0]} is larger than the image "
                             f"{width}x{height}")

    itemsize = torch.empty((), dtype=dtype).element_size()
    mixed = dtype != torch.float32
    states, temporaries = OPTIMIZERS[optimizer]
    trainable = _param_numel(stream, True) + _param_numel(head, True)
    total_params = _param_numel(stream, False) + _param_numel(head, False)
    param_bytes = total_params * 4
    grad_bytes = trainable * 4
    optimizer_bytes = states * trainable * 4
    # Always alive: float32 parameters, optimizer state, and (mixed) autocast's weight copies.
    base = param_bytes + optimizer_bytes + (total_params * itemsize if mixed else 0)
    step_phase = param_bytes + optimizer_bytes + grad_bytes + temporaries * trainable * 4

    with eval_mode(stream, head):
        meta_stream, meta_head = _meta_copy(stream, dtype), _meta_copy(head, dtype)
        shape = (batch, channels, height, width)
        image = torch.empty(shape, dtype=dtype, device="meta")
        try:
            stream_flops, fmap = _forward_flops(meta_stream, image)
            head_flops, _ = _forward_flops(meta_head, fmap)
        except RuntimeError as exc:
            raise InputError(f"image {width}x{height} is too small for this model "
                             f"({str(exc).splitlines()[0]})") from None
        conv = _conventional_trace(meta_stream, meta_head, image)
        grad_fix = _grad_fix(meta_stream, meta_head, itemsize)
        conv_peak = max(base + image.numel() * itemsize + conv.peak + grad_fix, step_phase)
        rows = [MemoryRow("conventional", None, param_bytes, grad_bytes, optimizer_bytes,
                          conv.saved, 0, 0, conv_peak)]
        common = _Common(meta_stream, meta_head, fmap.detach(), dtype, base, step_phase,
                         conv_peak, (param_bytes, grad_bytes, optimizer_bytes), stream_flops,
                         head_flops)
        pooling = head_global_pool(head) if whole_slide else None
        for tile in tiles:
            scnn = StreamingCNN(stream, tile, engine)
            if pooling is not None:
                rows.append(_whole_slide_row(common, scnn, shape, pooling))
            elif scnn.engine_for(shape) == "halo":
                rows.append(_halo_row(common, scnn, shape))
            else:
                rows.append(_crop_row(common, scnn, shape))
    return MemoryEstimate((height, width), batch, channels, str(dtype).removeprefix("torch."),
                          optimizer, tuple(common.fmap.shape), rows)  # type: ignore[arg-type]


def _grad_fix(stream: _MetaModule, head: _MetaModule, itemsize: int) -> int:
    """Gradient bytes a trace counts in dtype that are float32 under mixed precision."""
    return stream.grad_fix(itemsize) + head.grad_fix(itemsize)


@dataclass
class _Common:
    """What every streaming row of one estimate shares."""

    stream: _MetaModule
    head: _MetaModule
    fmap: torch.Tensor  # the whole image's feature map (meta)
    dtype: torch.dtype
    base: int  # always alive: parameters, optimizer state, autocast's weight copies
    step_phase: int  # peak of optimizer.step()
    conv_peak: int
    state: tuple[int, int, int]  # parameters, gradients, optimizer state (bytes)
    stream_flops: int
    head_flops: int
    _head: _Trace | None = None

    @property
    def itemsize(self) -> int:
        return self.fmap.element_size()

    @property
    def grad_fix(self) -> int:
        return _grad_fix(self.stream, self.head, self.itemsize)

    @property
    def head_trace(self) -> _Trace:
        if self._head is None:
            self._head = _head_trace(self.head, self.fmap)
        return self._head

    def overhead(self, stream_passes: float) -> float:
        """Training FLOPs relative to conventional when the stream's forward and backward
        cost `stream_passes` times a whole-image forward (conventional: 3)."""
        return round((stream_passes * self.stream_flops + 3 * self.head_flops)
                     / max(1, 3 * self.stream_flops + 3 * self.head_flops), 3)

    def row(self, scnn: StreamingCNN, engine: str, activations: int, tile_peak: int,
            step_peak: int, num_tiles: int, largest_crop: tuple[int, int] | None,
            stream_passes: float, path: str = "feature map") -> MemoryRow:
        peak = max(self.base + step_peak, self.step_phase)
        feature_map = 2 * self.fmap.numel() * self.itemsize if path == "feature map" else 0
        return MemoryRow("streaming", scnn.tile_size, *self.state, activations, feature_map,
                         tile_peak, peak, num_tiles=num_tiles, largest_crop=largest_crop,
                         compute_overhead=self.overhead(stream_passes),
                         saving=round(1 - peak / self.conv_peak, 4), engine=engine,
                         path=path)


def _crop_row(common: _Common, scnn: StreamingCNN, shape: tuple[int, ...]) -> MemoryRow:
    """The crop engine: its phases (module docstring) from traces of the largest crop."""
    plan = scnn.plan(shape)
    crop_shape = (*shape[:2], *plan.largest_crop)
    forward = _tile_forward_trace(common.stream, crop_shape, common.dtype)
    backward = _tile_backward_trace(common.stream, crop_shape, common.dtype, common.fmap)
    fmap_bytes = common.fmap.numel() * common.itemsize
    head = common.head_trace
    phases = [
        fmap_bytes + forward.peak,
        fmap_bytes + head.peak + common.head.grad_fix(common.itemsize),
        2 * fmap_bytes + common.head.grads_bytes(4) + backward.peak
        + common.stream.grad_fix(common.itemsize)
        + common.stream.grads_bytes(4) * (2 if len(plan) > 1 else 1),
    ]
    height, width = shape[-2:]
    area = (sum(s.in1 - s.in0 for s in plan.rows)
            * sum(s.in1 - s.in0 for s in plan.cols)) / (height * width)
    return common.row(scnn, "crop", backward.saved + head.saved, backward.peak, max(phases),
                      len(plan), plan.largest_crop, 4 * area)


class _MetaSource:
    """An image on the meta device whose every read is a new tensor, as when a slide is read
    lazily: the regions a step reads count, the whole image does not."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def read(self, box: tuple[int, int, int, int]) -> torch.Tensor:
        y0, y1, x0, x1 = box
        return torch.empty((*self.shape[:2], y1 - y0, x1 - x0), dtype=self.dtype,
                           device="meta")


def _halo_step_trace(common: _Common, tile: tuple[int, int], shape: tuple[int, ...],
                     ) -> tuple[int, int]:
    """One training step streamed by the halo engine itself on the meta device (its
    recipes, line buffers and gradient sums as they are): (live peak in bytes, elements
    that grow with the image: `_growing` and the feature map with its gradient)."""
    scnn = StreamingCNN(common.stream.module, tile)
    program = scnn.halo_program(shape)  # planned outside the trace: planning on meta
    assert program is not None          # tensors holds no real memory
    fmap_numel = 0

    def step() -> None:
        nonlocal fmap_numel
        fmap = scnn(_MetaSource(shape, common.dtype))
        fmap_numel = fmap.numel()
        logits = common.head(fmap)
        del fmap  # as `head(stream(image))` in a training loop: the head keeps what it needs
        _loss(logits).backward()

    trace = _trace(step, [*common.stream.tensors, *common.head.tensors])
    common.stream.fresh_grads()
    common.head.fresh_grads()
    return trace.peak, _growing(program) + 2 * fmap_numel


def _growing(program: HaloProgram) -> int:
    """Elements of the step's peak that grow with the image, for the halo engine: the halo
    strips kept for the backward, and two gradient line buffers (the backward's peak comes
    while one tile row hands its strips' gradients to the next); the feature map and its
    gradient are added by the caller."""
    return program.saved_halo_elements() + 2 * program.line_buffer_elements()


def _halo_row(common: _Common, scnn: StreamingCNN, shape: tuple[int, ...]) -> MemoryRow:
    """The halo engine: a step traced on an image of at most PROXY_TILES x PROXY_TILES of
    the plan's tiles (the engine's Python costs about a millisecond per op on meta
    tensors), plus the elements that grow with the image beyond it (`_growing`, the
    feature map and its gradient), known exactly for the whole image. Against full traces
    of 8 x 8 tiles (ResNet-18, tiles 256 and 512), within 4%. The proxy's smaller feature
    map can make its tiles recompute values the whole image's keep (`_mark_recomputed`
    keeps what is under 1/16 of the feature map): the trace then misses at most that much,
    against a peak that holds the feature map twice."""
    plan = scnn.plan(shape)
    proxy = _proxy_shape(plan, shape)
    proxy_peak, proxy_growing = _halo_step_trace(common, scnn.tile_size, proxy)
    program = scnn.halo_program(shape)
    assert program is not None
    fmap_numel = common.fmap.numel()
    grown = _growing(program) + 2 * fmap_numel - proxy_growing
    step_peak = proxy_peak + grown * common.itemsize + common.grad_fix
    kept = program.saved_halo_elements() * common.itemsize
    return common.row(scnn, "halo", kept + common.head_trace.saved,
                      step_peak - kept - 2 * fmap_numel * common.itemsize, step_peak,
                      len(plan), None, 4)


def _whole_slide_row(common: _Common, scnn: StreamingCNN, shape: tuple[int, ...],
                     pooling: str) -> MemoryRow:
    """The whole-slide path (module docstring): the larger of the pooling forward's peak and
    one crop's re-run in the backward, above the model state."""
    plan = scnn.plan(shape)
    engine = scnn.engine_for(shape)
    crop_shape = (*shape[:2], *plan.largest_crop)
    forward = (_pooled_forward_peak(common, scnn, shape, pooling) if engine == "halo"
               else _tile_forward_trace(common.stream, crop_shape, common.dtype).peak)
    out_tile = [max(span.out1 - span.out0 for span in spans) for spans in (plan.rows, plan.cols)]
    grad_block = torch.empty((*common.fmap.shape[:2], *out_tile), dtype=common.dtype,
                             device="meta")
    backward = _tile_backward_trace(common.stream, crop_shape, common.dtype, grad_block)
    # GradientSum adds each gradient to one sum per parameter as autograd makes it
    backward_phase = (backward.peak + grad_block.numel() * common.itemsize
                      + common.head.grads_bytes(4) + common.stream.grad_fix(common.itemsize)
                      + common.stream.grads_bytes(4))
    height, width = shape[-2:]
    area = (sum(s.in1 - s.in0 for s in plan.rows)
            * sum(s.in1 - s.in0 for s in plan.cols)) / (height * width)
    forward_passes = 1 if engine == "halo" else area  # the halo forward computes no margins
    return common.row(scnn, engine, backward.saved, backward.peak, max(forward, backward_phase),
                      len(plan), plan.largest_crop, forward_passes + 3 * area,
                      path="whole-slide")


def _pooled_forward_peak(common: _Common, scnn: StreamingCNN, shape: tuple[int, ...],
                         pooling: str) -> int:
    """Live peak of the halo engine's pooling forward (no grad) for the whole image: traced
    on a proxy grid that holds the first region of every layer (deep layers gather regions
    of MIN_REGION_PREDICT outputs over several tiles; at least PROXY_TILES tiles per axis),
    plus the line buffers (two: the one read and the one written) for the rest of the
    width."""
    meta = StreamingCNN(common.stream.module, scnn.tile_size)
    whole = meta.halo_program(shape, training=False)  # planned outside the trace: planning
    assert whole is not None                          # on meta tensors holds no memory
    proxy = _proxy_shape(scnn.plan(shape), shape, _first_regions(whole))
    meta.halo_program(proxy, training=False)

    def forward() -> None:
        with torch.no_grad():
            # attention pooling's forward holds what averaging does, plus per-region
            # logits and (N, K, C') sums: the same tiles, a few channels more per region
            mode = "avg" if pooling == "attention" else pooling
            meta.global_pool(_MetaSource(proxy, common.dtype), mode)

    peak = _trace(forward, common.stream.tensors).peak
    small = meta.halo_program(proxy, training=False)
    assert small is not None
    return peak + 2 * (whole.line_buffer_elements() - small.line_buffer_elements()) \
        * common.itemsize


def _first_regions(program: HaloProgram) -> tuple[int, int]:
    """Tiles per axis until every node has computed a region (rows, columns)."""
    return tuple(max(next(k for k, edge in enumerate(schedule) if edge > 0)  # type: ignore
                     for schedule in (getattr(n, axis) for n in program.nodes if n.rows))
                 for axis in ("rows", "cols"))


def _proxy_shape(plan: TilePlan, shape: tuple[int, ...], least: tuple[int, int] = (0, 0)
                 ) -> tuple[int, ...]:
    """An image of max(PROXY_TILES, least) tiles of the plan's per axis, or the image where
    it has fewer (the halo engine costs about a millisecond per op and tile on meta)."""
    sides = []
    for side, spans, wanted in zip(shape[-2:], (plan.rows, plan.cols), least):
        tiles = max(PROXY_TILES, wanted)
        sides.append(side if len(spans) <= tiles else tiles * side // len(spans))
    return (*shape[:2], *sides)


def largest_fitting_row(estimate: MemoryEstimate, budget_bytes: int) -> MemoryRow | None:
    """The streaming row with the largest tile (fewest tiles, least overhead) whose predicted
    peak fits in `budget_bytes`, or None when none does."""
    fitting = [r for r in estimate.rows if r.mode == "streaming" and r.peak_bytes <= budget_bytes]
    return max(fitting, key=lambda r: r.tile_size[0] * r.tile_size[1]) if fitting else None


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise InputError(f"unsupported dtype {dtype}; valid: {', '.join(_DTYPES)}")
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _tile_pair(tile: int | Sequence[int]) -> tuple[int, int]:
    pair = (int(tile), int(tile)) if isinstance(tile, int) else tuple(int(t) for t in tile)
    if len(pair) != 2 or min(pair) <= 0:
        raise InputError(f"tile size must be a positive int or (height, width), got {tile}")
    return pair  # type: ignore[return-value]
