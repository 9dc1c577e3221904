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

The crop traced is the plan's largest crop (`StreamingCNN(stream, tile).plan(shape)
.largest_crop`); the input image of a streaming run is read lazily per crop (an ImageSource),
so only the crop counts. Mixed precision (dtype float16/bfloat16): activations in dtype,
parameters, gradients and optimizer state in float32, plus a dtype copy of the weights
(autocast's cast cache). Modules are traced in eval mode (frozen BatchNorm, as streaming
requires; dropout off).

Compute overhead of streaming: the stream's forward runs on overlapping crops twice (forward,
and again in the backward) and its backward once (about 2x a forward), so with f = sum of crop
areas / image area and F_s, F_h the forward FLOPs of stream and head on the whole image,

    overhead = (4 f F_s + 3 F_h) / (3 F_s + 3 F_h)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from sstream.engine.streaming import StreamingCNN

__all__ = ["OPTIMIZERS", "MemoryEstimate", "MemoryRow", "estimate_training_memory",
           "largest_fitting_row"]

OPTIMIZERS: dict[str, tuple[int, int]] = {
    # name: (state tensors per parameter, parameter-sized temporaries during step())
    "adamw": (2, 1),
    "sgd": (1, 0),  # with momentum
}
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
            image (conventional), or one crop through the stream plus the head (streaming).
        feature_map_bytes: the streamed feature map plus its gradient (0 for conventional).
        tile_peak_bytes: live bytes inside one crop's backward re-run (0 for conventional).
        peak_bytes: the predicted peak of the step.
        num_tiles: tiles in the plan (1 for conventional).
        largest_crop: (height, width) of the largest crop a tile runs; None for conventional.
        compute_overhead: training FLOPs relative to conventional (1.0 for conventional).
        saving: 1 - peak / conventional peak (0.0 for conventional).
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


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive; their peak.

    Storages of `external` tensors (parameters, inputs made beforehand) are not counted. A
    storage is counted once, however many views or in-place results share it, and leaves the
    count when its weak reference dies.
    """

    def __init__(self, external: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.external = {_storage_key(t) for t in external}
        self.sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
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
        self.external = {_storage_key(t) for t in external}
        self.sizes: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
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
    module: nn.Module
    state: dict[str, torch.Tensor]
    params: list[torch.Tensor]  # the trainable ones (requires_grad), in state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, self.state, (x,))

    def grads_bytes(self, itemsize: int) -> int:
        return sum(p.numel() for p in self.params) * itemsize

    def fresh_grads(self) -> None:
        for p in self.params:
            p.grad = None


def _meta_copy(module: nn.Module, dtype: torch.dtype) -> _MetaModule:
    state: dict[str, torch.Tensor] = {}
    params = []
    for name, p in module.named_parameters():
        meta = torch.empty(p.shape, dtype=dtype, device="meta").requires_grad_(p.requires_grad)
        state[name] = meta
        if p.requires_grad:
            params.append(meta)
    for name, b in module.named_buffers():
        state[name] = torch.empty(b.shape, device="meta",
                                  dtype=dtype if b.is_floating_point() else b.dtype)
    return _MetaModule(module, state, params)


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

    external = [image, *stream.state.values(), *head.state.values()]
    trace = _trace(step, external)
    stream.fresh_grads()
    head.fresh_grads()
    return trace


def _head_trace(head: _MetaModule, fmap: torch.Tensor) -> _Trace:
    leaf = fmap.detach().requires_grad_(True)

    def step() -> None:
        _loss(head(leaf)).backward()

    trace = _trace(step, [leaf, *head.state.values()])
    head.fresh_grads()
    return trace


def _tile_forward_trace(stream: _MetaModule, crop_shape: tuple[int, ...],
                        dtype: torch.dtype) -> _Trace:
    def forward() -> None:
        with torch.no_grad():
            stream(torch.empty(crop_shape, dtype=dtype, device="meta"))

    return _trace(forward, list(stream.state.values()))


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

    return _trace(rerun, [grad_fmap, *stream.state.values()])


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

    Returns:
        A MemoryEstimate: a conventional row, then one streaming row per tile size, ascending.

    Raises:
        ValueError: unknown optimizer or dtype, non-positive sizes, a tile larger than the
            image, or an image too small for the model.
        UnsupportedModuleError: the stream cannot be streamed (from StreamingCNN).
    """
    dtype = _as_dtype(dtype)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0 or batch <= 0 or channels <= 0:
        raise ValueError(f"image size, batch and channels must be positive, got {image_size}, "
                         f"{batch}, {channels}")
    tiles = sorted({_tile_pair(t) for t in tile_sizes})
    for tile in tiles:
        if tile[0] > height or tile[1] > width:
            raise ValueError(f"tile {tile[1]}x{tile[0]} is larger than the image "
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

    with _all_eval(stream, head):
        meta_stream, meta_head = _meta_copy(stream, dtype), _meta_copy(head, dtype)
        # Grad bytes a trace counts in dtype that are really float32 under mixed precision.
        grad_fix_stream = meta_stream.grads_bytes(4 - itemsize)
        grad_fix_head = meta_head.grads_bytes(4 - itemsize)
        shape = (batch, channels, height, width)
        image = torch.empty(shape, dtype=dtype, device="meta")
        try:
            stream_flops, fmap = _forward_flops(meta_stream, image)
            head_flops, _ = _forward_flops(meta_head, fmap)
        except RuntimeError as exc:
            raise ValueError(f"image {width}x{height} is too small for this model "
                             f"({str(exc).splitlines()[0]})") from None
        fmap = fmap.detach()
        fmap_bytes = fmap.numel() * itemsize

        conv = _conventional_trace(meta_stream, meta_head, image)
        conv_peak = max(base + image.numel() * itemsize + conv.peak + grad_fix_stream
                        + grad_fix_head, step_phase)
        rows = [MemoryRow("conventional", None, param_bytes, grad_bytes, optimizer_bytes,
                          conv.saved, 0, 0, conv_peak)]

        head_trace = _head_trace(meta_head, fmap) if tiles else None
        for tile in tiles:
            scnn = StreamingCNN(stream, tile)
            plan = scnn.plan(shape)
            crop_shape = (batch, channels, *plan.largest_crop)
            forward = _tile_forward_trace(meta_stream, crop_shape, dtype)
            backward = _tile_backward_trace(meta_stream, crop_shape, dtype, fmap)
            assert head_trace is not None
            phases = [
                fmap_bytes + forward.peak,
                fmap_bytes + head_trace.peak + grad_fix_head,
                2 * fmap_bytes + meta_head.grads_bytes(4) + backward.peak + grad_fix_stream
                + meta_stream.grads_bytes(4) * (2 if len(plan) > 1 else 1),
            ]
            peak = max(base + max(phases), step_phase)
            area = (sum(s.in1 - s.in0 for s in plan.rows)
                    * sum(s.in1 - s.in0 for s in plan.cols)) / (height * width)
            overhead = ((4 * area * stream_flops + 3 * head_flops)
                        / max(1, 3 * stream_flops + 3 * head_flops))
            rows.append(MemoryRow(
                "streaming", scnn.tile_size, param_bytes, grad_bytes, optimizer_bytes,
                backward.saved + head_trace.saved, 2 * fmap_bytes, backward.peak, peak,
                num_tiles=len(plan), largest_crop=plan.largest_crop,
                compute_overhead=round(overhead, 3),
                saving=round(1 - peak / conv_peak, 4)))
    return MemoryEstimate((height, width), batch, channels, str(dtype).removeprefix("torch."),
                          optimizer, tuple(fmap.shape), rows)  # type: ignore[arg-type]


def largest_fitting_row(estimate: MemoryEstimate, budget_bytes: int) -> MemoryRow | None:
    """The streaming row with the largest tile (fewest tiles, least overhead) whose predicted
    peak fits in `budget_bytes`, or None when none does."""
    fitting = [r for r in estimate.rows if r.mode == "streaming" and r.peak_bytes <= budget_bytes]
    return max(fitting, key=lambda r: r.tile_size[0] * r.tile_size[1]) if fitting else None


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"unsupported dtype {dtype}; valid: {', '.join(_DTYPES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _tile_pair(tile: int | Sequence[int]) -> tuple[int, int]:
    pair = (int(tile), int(tile)) if isinstance(tile, int) else tuple(int(t) for t in tile)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"tile size must be a positive int or (height, width), got {tile}")
    return pair  # type: ignore[return-value]


class _all_eval:  # noqa: N801 - used as a context manager
    """Eval mode for the modules while tracing; every submodule's flag restored after."""

    def __init__(self, *modules: nn.Module) -> None:
        self.flags = [(m, m.training) for module in modules for m in module.modules()]
        self.modules = modules

    def __enter__(self) -> None:
        for module in self.modules:
            module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, training in self.flags:
            m.training = training
