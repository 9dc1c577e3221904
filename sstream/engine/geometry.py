"""Receptive-field geometry of a stream, derived from its torch.fx graph.

A stream is exact to tile only if every operation in it is *local*: output position j (per
axis) depends on a bounded window of input positions. This module traces the stream with
torch.fx, checks every node against a table of operations known to be local, and propagates
the window arithmetic of docs/design.md (section 3) through the graph, branches included:

    output j of a node depends on stream-input positions [j*S - lo, j*S + hi]

    through an op with kernel extent e = d*(k-1) + 1, stride s, left padding p:
        lo <- lo + p * S
        hi <- hi + (e - 1 - p) * S
        S  <- S * s

Elementwise ops keep (S, lo, hi); where branches meet (add, cat) S must agree and lo, hi take
the maximum. Anything not provably local raises UnsupportedModuleError naming the module.

Besides the window, every node carries the positions of its two spatial dimensions, so that
per-pixel ops written channels-last (ConvNeXt's permute -> LayerNorm/Linear -> permute) are
recognised as local while ops that would mix positions are refused.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from sstream.errors import InputError


class UnsupportedModuleError(InputError):
    """The stream contains an operation that cannot be streamed exactly.

    The message names the module (its qualified name in the stream and its type) and why.
    """


@dataclass(frozen=True)
class AxisWindow:
    """Dependency window along one axis: output j reads input [j*stride - lo, j*stride + hi].

    `reach` is what output j needs to *exist*: an input of length L has output j only if
    j*stride + reach <= L - 1 (conservative: padding can make outputs exist that depend on
    no input pixel at all, e.g. padding larger than the kernel).
    """

    stride: int = 1
    lo: int = 0
    hi: int = 0
    reach: int = 0

    def through(self, extent: int, stride: int, pad_before: int, pad_after: int) -> AxisWindow:
        """The window after one sliding-window op (kernel extent, stride, padding)."""
        return AxisWindow(
            stride=self.stride * stride,
            lo=self.lo + pad_before * self.stride,
            hi=self.hi + (extent - 1 - pad_before) * self.stride,
            reach=self.reach + max(0, extent - 1 - pad_before - pad_after) * self.stride,
        )

    def merge(self, other: AxisWindow) -> AxisWindow:
        """The window of a node that combines two branches (residual add, concatenation)."""
        if self.stride != other.stride:
            raise InputError(f"branches with different output strides ({self.stride} and "
                             f"{other.stride}) meet")
        return AxisWindow(self.stride, max(self.lo, other.lo), max(self.hi, other.hi),
                          max(self.reach, other.reach))


@dataclass(frozen=True)
class StreamGeometry:
    """How the stream's output grid relates to its input grid, per axis (y, x).

    `stride` is the output stride S (input pixels per output pixel); output pixel j depends on
    input pixels [j*S - lo, j*S + hi]. The overlap a tile needs is `lo` before and `hi` after.
    `layers` lists (name, y window, x window) for every local op, in graph order.
    """

    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]
    reach: tuple[int, int]
    layers: tuple[tuple[str, AxisWindow, AxisWindow], ...] = ()

    @property
    def receptive_field(self) -> tuple[int, int]:
        """Input pixels one output pixel can see, per axis (y, x)."""
        return (self.lo[0] + self.hi[0] + 1, self.lo[1] + self.hi[1] + 1)

    @property
    def overlap(self) -> tuple[int, int]:
        """Extra input pixels around a tile, per axis (y, x): lo + hi."""
        return (self.lo[0] + self.hi[0], self.lo[1] + self.hi[1])

    def axis(self, dim: int) -> AxisWindow:
        """The whole stream's window along axis 0 (y) or 1 (x)."""
        return AxisWindow(self.stride[dim], self.lo[dim], self.hi[dim], self.reach[dim])


@dataclass(frozen=True)
class _Spatial:
    """A traced value that depends on the stream input: its windows and spatial dim positions."""

    y: AxisWindow
    x: AxisWindow
    ndim: int
    hdim: int
    wdim: int

    def with_windows(self, y: AxisWindow, x: AxisWindow) -> _Spatial:
        return _Spatial(y, x, self.ndim, self.hdim, self.wdim)


class _Refusal(Exception):
    """Internal: a node is not local; carries the reason (the caller adds the module name)."""


# --------------------------------------------------------------------------------------------
# The table of local operations


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)

_REFUSED_MODULES: dict[tuple[type[nn.Module], ...], str] = {
    (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LazyInstanceNorm2d):
        "normalises with statistics over all spatial positions, which a tile cannot see",
    (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d):
        "adaptive/global pooling mixes all positions; put it in the head, after the stream",
    (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ConvTranspose2d,
     nn.PixelShuffle, nn.PixelUnshuffle):
        "upsampling and transposed convolutions are not supported by the streaming engine",
    (nn.MultiheadAttention,):
        "attention mixes all positions",
    (nn.Flatten, nn.Unflatten):
        "flattening mixes spatial positions into channels",
}

_ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish,
    F.elu, F.selu, F.celu, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt,
    torch.clamp, torch.clip, torch.square, operator.neg, operator.pos,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt",
    "rsqrt", "clamp", "clamp_", "clip", "square", "contiguous", "clone", "float", "double",
    "half", "bfloat16", "detach",
}
_BINARY_FUNCTIONS: set[Any] = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_CAT_FUNCTIONS: set[Any] = {torch.cat, torch.concat, torch.concatenate}


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


_Axis = tuple[int, int, int, int]  # (kernel extent, stride, padding before, padding after)


def conv_axes(conv: nn.Conv2d) -> list[_Axis]:
    """Per-axis window parameters of a Conv2d, including padding='same'/'valid'."""
    kernel, stride, dilation = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if conv.padding == "valid":
        return [(e, s, 0, 0) for e, s in zip(extents, stride)]
    if conv.padding == "same":  # torch pads the extra pixel (odd total) after the input
        return [(e, s, (e - 1) // 2, e - 1 - (e - 1) // 2) for e, s in zip(extents, stride)]
    return [(e, s, p, p) for e, s, p in zip(extents, stride, _pair(conv.padding))]


def pool_axes(pool: nn.MaxPool2d | nn.AvgPool2d) -> list[_Axis]:
    """Per-axis window parameters of a pooling layer (ceil_mode only adds outputs at the end,
    so the floor-mode existence rule used for `reach` stays conservative)."""
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride not in (None, ()) else pool.kernel_size)
    padding = _pair(pool.padding)
    dilation = _pair(getattr(pool, "dilation", 1))
    return [(d * (k - 1) + 1, s, p, p) for k, s, p, d in zip(kernel, stride, padding, dilation)]


def _window_op(value: _Spatial, axes: list[_Axis]) -> _Spatial:
    if (value.hdim, value.wdim) != (value.ndim - 2, value.ndim - 1):
        raise _Refusal("a sliding-window op applied to a tensor that is not (N, C, H, W)")
    return value.with_windows(value.y.through(*axes[0]), value.x.through(*axes[1]))


def _require_channel_last_dims(value: _Spatial, count: int, what: str) -> None:
    """Ops that act on the last `count` dims are per-pixel only if those are not spatial."""
    acted_on = set(range(value.ndim - count, value.ndim))
    if acted_on & {value.hdim, value.wdim}:
        raise _Refusal(f"{what} acts on a spatial dimension")


def _module_rule(module: nn.Module, value: _Spatial) -> _Spatial:
    """The output geometry of a leaf module, or _Refusal."""
    for types, reason in _REFUSED_MODULES.items():
        if isinstance(module, types):
            raise _Refusal(reason)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise _Refusal(f"padding_mode={module.padding_mode!r} is not supported (only zeros)")
        return _window_op(value, conv_axes(module))
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise _Refusal("return_indices=True is not supported")
        return _window_op(value, pool_axes(module))
    if isinstance(module, nn.AvgPool2d):
        return _window_op(value, pool_axes(module))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training:
            raise _Refusal("BatchNorm in training mode uses statistics of the whole image batch; "
                           "call .eval() on it to stream with frozen statistics")
        if module.running_mean is None:
            raise _Refusal("BatchNorm without running statistics uses batch statistics")
        return value
    if isinstance(module, _DROPOUT_MODULES):
        if module.training and module.p > 0:
            raise _Refusal("dropout in training mode draws a new random mask when a tile is "
                           "re-run for the backward pass; use eval mode or p=0")
        return value
    if isinstance(module, _ELEMENTWISE_MODULES):
        return value
    if isinstance(module, nn.LocalResponseNorm):
        if value.hdim != value.ndim - 2:
            raise _Refusal("LocalResponseNorm on a tensor that is not (N, C, H, W)")
        return value
    if isinstance(module, nn.Linear):
        _require_channel_last_dims(value, 1, "Linear")
        return value
    if isinstance(module, nn.LayerNorm):
        _require_channel_last_dims(value, len(module.normalized_shape), "LayerNorm")
        return value
    raise _Refusal(f"{type(module).__name__} is not a recognised local operation")


# --------------------------------------------------------------------------------------------
# Tracing


class _StreamTracer(fx.Tracer):
    """torch.fx tracer that stops at torch.nn modules (rules above) and enters user modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule of `modules` in eval mode, restoring each one's flag
    afterwards (a model's mix of train and eval flags is the user's, not ours to change)."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def meta_call(module: nn.Module, *inputs: torch.Tensor) -> Any:
    """`module(*inputs)` on the meta device, without autograd: shapes without memory or
    compute. The module's parameters and buffers stand in as meta tensors of their shapes
    for this call only; the module itself is not changed."""
    state = {name: torch.empty_like(t, device="meta")
             for name, t in [*module.named_parameters(), *module.named_buffers()]}
    with torch.no_grad(), _MetaShortcuts():
        return torch.func.functional_call(module, state, inputs)


class _MetaShortcuts(TorchDispatchMode):
    """Ops on meta tensors, with `meta_shortcut` for those whose meta kernels are slow
    (ResNet-34's BatchNorms in planning: estimate-memory at 8192 px took 50 s, 29 s with
    the shortcuts)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = meta_shortcut(func, args)
        return func(*args, **(kwargs or {})) if out is None else out


_aten = torch.ops.aten


def meta_shortcut(func: Any, args: tuple[Any, ...]) -> Any:
    """The result of a few ops whose meta kernels are slow Python decompositions (about 1 ms
    a call: most of a meta-device trace of the halo engine, and of planning, which bisects
    for the smallest input a stream accepts) and whose result has the shape of their first
    tensor: made directly, or None to run the op."""
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.device.type != "meta":
        return None
    if func in _SAME_SHAPE:
        if all(not isinstance(a, torch.Tensor)
               or (a.shape == first.shape and a.dtype == first.dtype) for a in args):
            return _like(first)
        return None
    if func is _aten.native_batch_norm.default:  # (out, save_mean, save_invstd)
        channels = first.shape[1]
        return (_like(first), first.new_empty(channels), first.new_empty(channels))
    if func is _aten._native_batch_norm_legit_no_training.default:  # eval mode: the same,
        stats = torch.promote_types(first.dtype, torch.float32)     # statistics in float32+
        return (_like(first), *(first.new_empty(first.shape[1], dtype=stats)
                                           for _ in range(2)))
    if func is _aten.native_batch_norm_backward.default:  # (grad_in, grad_w, grad_b)
        weight, mask = args[2], args[-1]
        return (_like(first) if mask[0] else None,
                *(_like(weight) if wanted and weight is not None else None
                  for wanted in mask[1:]))
    return None


def _like(tensor: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(tensor) for a dense tensor, made directly: on meta tensors
    empty_like is a Python reference implementation too (0.15 ms a call)."""
    if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                   device=tensor.device)
    return torch.empty_like(tensor)


_SAME_SHAPE = {_aten.relu.default, _aten.threshold_backward.default, _aten.add.Tensor,
               _aten.mul.Tensor}


def training_flags(module: nn.Module) -> tuple[bool, ...]:
    """The train/eval flag of every submodule: geometry depends on them (BN, dropout)."""
    return tuple(m.training for m in module.modules())


def _node_label(node: fx.Node, root: nn.Module) -> str:
    """'name (Type)' of the module a node belongs to, for error messages."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return f"'{node.target}' ({type(module).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, (_, module_type) = list(stack.items())[-1]
        owner = getattr(module_type, "__name__", str(module_type))
        return f"'{path.split('@')[0]}' ({owner})"
    return f"{type(root).__name__}.forward"


def analyse(stream: nn.Module, *, in_eval_mode: bool = False) -> StreamGeometry:
    """Trace `stream` and return its geometry, or raise UnsupportedModuleError.

    With `in_eval_mode`, the stream is analysed as if in eval mode (flags restored after), so
    that structural problems are found at construction while mode problems (BatchNorm or
    dropout in training mode) are found when the stream is called.
    """
    if in_eval_mode:
        with eval_mode(stream):
            return analyse(stream)
    try:
        graph = _StreamTracer().trace(stream)
    except UnsupportedModuleError:
        raise
    except Exception as exc:  # torch.fx raises many types for untraceable code
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModuleError(
            f"cannot stream {type(stream).__name__}: torch.fx could not trace it, so its "
            f"locality cannot be proven ({first_line})") from exc
    return _propagate(graph, stream)


def traced_values(stream: nn.Module) -> tuple[fx.Graph, dict[fx.Node, Any]]:
    """The stream's fx graph (stream in its current modes) and every node's value: a spatial
    description (window, layout) for nodes that depend on the input, else the constant.

    Raises UnsupportedModuleError like `analyse`."""
    try:
        graph = _StreamTracer().trace(stream)
    except Exception as exc:  # analyse() gives the user-facing message
        analyse(stream)
        raise UnsupportedModuleError(f"cannot trace {type(stream).__name__}") from exc
    values: dict[fx.Node, Any] = {}
    _propagate(graph, stream, values)
    return graph, values


def spatial_dims(value: Any) -> tuple[int, int] | None:
    """(height dim, width dim) of a traced value that depends on the input, else None."""
    return (value.hdim, value.wdim) if isinstance(value, _Spatial) else None


def _propagate(graph: fx.Graph, root: nn.Module,
               values: dict[fx.Node, Any] | None = None) -> StreamGeometry:
    values = {} if values is None else values
    layers: list[tuple[str, AxisWindow, AxisWindow]] = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModuleError(
            f"cannot stream {type(root).__name__}: its forward must take exactly one tensor")
    for node in graph.nodes:
        if node.op == "placeholder":
            values[node] = _Spatial(AxisWindow(), AxisWindow(), ndim=4, hdim=2, wdim=3)
            continue
        if node.op == "output":
            result = values[node.args[0]] if isinstance(node.args[0], fx.Node) else None
            if not isinstance(result, _Spatial) or (result.hdim, result.wdim) != (2, 3):
                raise UnsupportedModuleError(
                    f"cannot stream {type(root).__name__}: it must return one (N, C, H, W) "
                    "tensor computed from its input")
            return StreamGeometry(
                stride=(result.y.stride, result.x.stride), lo=(result.y.lo, result.x.lo),
                hi=(result.y.hi, result.x.hi), reach=(result.y.reach, result.x.reach),
                layers=tuple(layers))
        try:
            values[node] = _node_rule(node, root, values)
        except _Refusal as refusal:
            raise UnsupportedModuleError(
                f"cannot stream {_node_label(node, root)}: {refusal}") from None
        except ValueError as exc:  # AxisWindow.merge: branches of different stride
            raise UnsupportedModuleError(
                f"cannot stream {_node_label(node, root)}: {exc}") from None
        if isinstance(values[node], _Spatial) and node.op == "call_module":
            layers.append((str(node.target), values[node].y, values[node].x))
    raise UnsupportedModuleError(f"cannot stream {type(root).__name__}: its graph has no output")


def _materialise(arg: Any, values: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: values[n])


def _node_rule(node: fx.Node, root: nn.Module, values: dict[fx.Node, Any]) -> Any:
    """The value of one node: _Spatial if it depends on the input, else its concrete value."""
    args = _materialise(node.args, values)
    kwargs = _materialise(node.kwargs, values)
    spatial = [a for a in _flatten(args, kwargs) if isinstance(a, _Spatial)]
    if node.op == "get_attr":
        return fetch_attr(root, str(node.target))
    if not spatial:
        return _evaluate_constant(node, root, args, kwargs)
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if len(args) != 1 or kwargs:
            raise _Refusal("a module called with more than one argument")
        return _module_rule(module, args[0])
    if node.op == "call_function":
        return _function_rule(node.target, args, kwargs, spatial)
    if node.op == "call_method":
        return _method_rule(str(node.target), args, kwargs, spatial)
    raise _Refusal(f"unexpected graph node kind {node.op!r}")


def _flatten(args: Any, kwargs: dict[str, Any]) -> list[Any]:
    flat: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, (list, tuple)):
            for inner in item:
                visit(inner)
        elif isinstance(item, dict):
            for inner in item.values():
                visit(inner)
        else:
            flat.append(item)

    visit(args)
    visit(kwargs)
    return flat


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The submodule, parameter or buffer at a dotted fx target ('layer1.0.conv1.weight')."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _evaluate_constant(node: fx.Node, root: nn.Module, args: Any, kwargs: Any) -> Any:
    """Nodes that do not depend on the input (e.g. a layer-scale parameter) are evaluated."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise _Refusal("a module applied to something other than the stream's input")


def _function_rule(target: Callable[..., Any], args: Any, kwargs: Any,
                   spatial: list[_Spatial]) -> _Spatial:
    if target in _ELEMENTWISE_FUNCTIONS:
        return _elementwise(args, kwargs, spatial)
    if target in _BINARY_FUNCTIONS:
        return _broadcast(args, kwargs, spatial)
    if target in _CAT_FUNCTIONS:
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return _concatenate(tensors, dim)
    if target is torch.permute:
        return _permute(args[0], args[1] if len(args) > 1 else kwargs["dims"])
    if target is F.layer_norm:
        normalized_shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        _require_channel_last_dims(spatial[0], len(tuple(normalized_shape)), "layer_norm")
        return spatial[0]
    if target is F.dropout or target is F.dropout2d or _is_stochastic_depth(target):
        # dropout(input, p, training, ...); stochastic_depth(input, p, mode, training)
        p = _argument(args, kwargs, 1, "p", 0.5)
        training = _argument(args, kwargs, 3 if _is_stochastic_depth(target) else 2,
                             "training", True)
        if training and p > 0:
            raise _Refusal("dropout / stochastic depth in training mode draws new random masks "
                           "when a tile is re-run for the backward pass; use eval mode or p=0")
        return spatial[0]
    if target is getattr:
        raise _Refusal(f"it reads .{args[1]} of a feature map: code that depends on the "
                       "image's shape or layout cannot be proven local")
    name = getattr(target, "__name__", str(target))
    raise _Refusal(f"function {name}() is not a recognised local operation")


def _argument(args: Any, kwargs: Any, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _is_stochastic_depth(target: Any) -> bool:
    """torchvision.ops.stochastic_depth, an fx-wrapped function (torchvision not imported)."""
    return (getattr(target, "__name__", "") == "stochastic_depth"
            and getattr(target, "__module__", "").startswith("torchvision.ops"))


def _method_rule(name: str, args: Any, kwargs: Any, spatial: list[_Spatial]) -> _Spatial:
    if name in _ELEMENTWISE_METHODS:
        return _elementwise(args, kwargs, spatial)
    if name in _BINARY_METHODS:
        return _broadcast(args, kwargs, spatial)
    if name == "permute":
        dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
        return _permute(args[0], dims)
    raise _Refusal(f"method .{name}() is not a recognised local operation")


def _elementwise(args: Any, kwargs: Any, spatial: list[_Spatial]) -> _Spatial:
    if len(spatial) != 1 or args[0] is not spatial[0]:
        raise _Refusal("an elementwise op with more than one tensor operand")
    return spatial[0]


def _broadcast(args: Any, kwargs: Any, spatial: list[_Spatial]) -> _Spatial:
    """Binary elementwise op: input-dependent operands merge; constants must not vary in space."""
    first = spatial[0]
    merged_y, merged_x = first.y, first.x
    for other in spatial[1:]:
        if (other.ndim, other.hdim, other.wdim) != (first.ndim, first.hdim, first.wdim):
            raise _Refusal("operands with different layouts")
        merged_y, merged_x = merged_y.merge(other.y), merged_x.merge(other.x)
    for operand in _flatten(args, kwargs):
        if isinstance(operand, torch.Tensor):
            _require_constant_in_space(operand, first)
    return first.with_windows(merged_y, merged_x)


def _require_constant_in_space(tensor: torch.Tensor, value: _Spatial) -> None:
    offset = value.ndim - tensor.dim()
    if offset < 0:
        raise _Refusal("a constant operand with more dimensions than the feature map")
    for dim in (value.hdim, value.wdim):
        if dim - offset >= 0 and tensor.shape[dim - offset] != 1:
            raise _Refusal("a constant operand that varies over spatial positions (e.g. a "
                           "positional embedding) ties the output to absolute positions")


def _concatenate(tensors: Any, dim: int) -> _Spatial:
    parts = [t for t in tensors if isinstance(t, _Spatial)]
    if len(parts) != len(tensors):
        raise _Refusal("concatenation of the stream's features with a constant tensor")
    first = parts[0]
    dim = dim % first.ndim
    if dim in (first.hdim, first.wdim):
        raise _Refusal("concatenation along a spatial dimension")
    y, x = first.y, first.x
    for other in parts[1:]:
        if (other.ndim, other.hdim, other.wdim) != (first.ndim, first.hdim, first.wdim):
            raise _Refusal("concatenation of tensors with different layouts")
        y, x = y.merge(other.y), x.merge(other.x)
    return first.with_windows(y, x)


def _permute(value: Any, dims: Any) -> _Spatial:
    if not isinstance(value, _Spatial):
        raise _Refusal("permute of an unexpected operand")
    order = [int(d) % value.ndim for d in dims]
    if sorted(order) != list(range(value.ndim)):
        raise _Refusal(f"permute with invalid dims {list(dims)}")
    return _Spatial(value.y, value.x, value.ndim, order.index(value.hdim), order.index(value.wdim))
