"""What a tile's backward keeps in memory, beyond what autograd would keep by itself.

Two things make a streamed step hold more than one tile's share of plain PyTorch's memory:
the parameter gradients summed over tiles, and the per-pixel values (BatchNorm, activation,
residual-sum outputs) that autograd saves beside the convolution outputs they are computed
from. `GradientSum` adds each tile's gradients into one buffer per parameter; `Recipes` lets
a tile's re-run save a value as the recipe that recomputes it from values that are kept
anyway, so a conv-BN-ReLU layer keeps one tensor instead of two (in-place-ABN-like savings
for any chain of deterministic per-pixel ops; the backward recomputes the cheap per-pixel
ops once more); a convolution whose input is kept anyway (the image) can be a recipe too."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.fx.node import map_aggregate

# a recipe recomputes at most this many ops before it reaches kept tensors
MAX_RECIPE_DEPTH = 12


class GradientSum:
    """Per-parameter sums of the tiles' gradients.

    While `collecting`, hooks on the parameters add each gradient to its sum as soon as
    autograd has it and hand autograd a zero of no memory instead, so a tile's parameter
    gradients are not all held until its backward ends. Sums are added to in place once they
    are our own tensors (the first gradient is used as it comes: autograd may share it).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = params
        self.sums: list[torch.Tensor | None] = [None] * len(params)
        self._owned: set[int] = set()
        self._zeros: dict[int, torch.Tensor] = {}  # what autograd gets instead, per parameter

    @contextmanager
    def collecting(self) -> Iterator[None]:
        handles = [p.register_hook(functools.partial(self._take, i))
                   for i, p in enumerate(self.params) if p.requires_grad]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _take(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        total = self.sums[i]
        if total is None:
            self.sums[i] = grad
        elif i in self._owned:
            total.add_(grad)
        else:
            self.sums[i] = total + grad
            self._owned.add(i)
        if i not in self._zeros:
            self._zeros[i] = grad.new_zeros(()).expand_as(grad)
        return self._zeros[i]


class AutocastState:
    """The autocast state in force when made, to re-enter when a value is recomputed later
    (the backward runs outside the forward's `torch.autocast`). Devices without autocast
    (meta, on which the memory estimate runs the engine) have none."""

    def __init__(self, device: torch.device) -> None:
        self.device = device.type
        try:
            self.enabled = torch.is_autocast_enabled(self.device)
            self.dtype = torch.get_autocast_dtype(self.device)
        except RuntimeError:  # no autocast for this device type
            self.enabled, self.dtype = False, None

    def __call__(self) -> AbstractContextManager[Any]:
        """Enter this state; nothing to do where it is in force already (a tile's re-run on
        the CPU: making a torch.autocast costs more than recomputing a small value)."""
        if self.dtype is None or self == AutocastState(torch.device(self.device)):
            return nullcontext()
        return torch.autocast(self.device, self.dtype, enabled=self.enabled)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AutocastState) and (self.device, self.enabled, self.dtype) \
            == (other.device, other.enabled, other.dtype)

    def __hash__(self) -> int:
        return hash((self.device, self.enabled, self.dtype))


class _Recipe:
    """How to recompute one value: `call(args, kwargs)`, whose tensor operands are kept
    tensors or `_View`s of other recipes, under the autocast state of the forward pass.
    A value the backward unpacks is held until its last saved reference is unpacked (so a
    ReLU output saved twice is recomputed once); one recomputed as another's ingredient is
    held likewise only if `hold` (cheap per-pixel values: holding a large value for its
    own later turn can set the peak)."""

    def __init__(self, call: Callable[[Any, Any], Any], args: Any, kwargs: Any,
                 value: torch.Tensor, depth: int, hold: bool, autocast: AutocastState) -> None:
        self.call, self.args, self.kwargs, self.depth = call, args, kwargs, depth
        self.hold = hold
        self.autocast = autocast
        self.layout = _layout(value)
        self.pending = 0  # saved references the backward has not unpacked yet
        self._value: torch.Tensor | None = None

    def value(self, keep: bool = False) -> torch.Tensor:
        if self._value is not None:
            return self._value
        with torch.no_grad(), self.autocast():
            value = self.call(_resolve(self.args), _resolve(self.kwargs))
        if _layout(value) != self.layout:  # the views below would read wrong elements
            raise RuntimeError("a recomputed value has another layout than in the "
                               "forward pass")
        if (keep or self.hold) and self.pending > 0:
            self._value = value
        return value

    def unpacked(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self._value = None


class _View:
    """A tensor of the forward pass kept as a view (offset, size, stride) of a recipe's value."""

    def __init__(self, recipe: _Recipe, tensor: torch.Tensor) -> None:
        self.recipe = recipe
        self.geometry = (tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    def tensor(self, keep: bool = False) -> torch.Tensor:
        return self.recipe.value(keep).as_strided(*self.geometry)


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype,
            tensor.device)


def _resolve(tree: Any) -> Any:
    return map_aggregate(tree, lambda a: a.tensor() if isinstance(a, _View) else a)


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage, shared by all its views, while it lives (also on the
    meta device, where every data pointer is 0)."""
    return tensor.untyped_storage()._cdata


class _Saved:
    """One tensor autograd saved in a tile's re-run: the tensor itself, or the view of a
    recipe that recomputes it."""

    __slots__ = ("tensor", "view")

    def __init__(self, tensor: torch.Tensor | None, view: _View | None) -> None:
        self.tensor, self.view = tensor, view


class Recipes:
    """Saved-tensor hooks for one tile's re-run with autograd: a saved tensor that is (a view
    of) a noted value is kept as its recipe instead, and recomputed when the
    backward unpacks it. Exact: the engines already rely on re-running a tile giving the same
    numbers (BatchNorm in training mode and dropout are refused).

    An op saves its own output before the caller can note it (ReLU saves its result), so the
    tensors saved since the last note are looked at again when the next value is noted.
    """

    def __init__(self) -> None:
        self._by_storage: dict[int, _Recipe] = {}
        self._recent: list[_Saved] = []
        self._autocast: dict[torch.device, AutocastState] = {}  # in force when noted

    def note(self, value: Any, call: Callable[[Any, Any], Any], args: Any, kwargs: Any,
             hold: bool = True) -> None:
        """Record that `value` = call(args, kwargs), a value worth recomputing. `hold=False`:
        when it is recomputed as an ingredient of another value, it is dropped at once,
        not held until the backward unpacks it itself (it is recomputed again then)."""
        recent, self._recent = self._recent, []
        recipe = self._recipe(value, call, args, kwargs, hold)
        if recipe is None:
            return
        for saved in recent:
            if saved.tensor is not None and self._recipe_of(saved.tensor) is recipe:
                saved.view = self._view(recipe, saved.tensor)
                saved.tensor = None

    def _recipe(self, value: Any, call: Callable[[Any, Any], Any], args: Any, kwargs: Any,
                hold: bool) -> _Recipe | None:
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            return None
        key = storage_key(value)
        operands: list[torch.Tensor] = []
        map_aggregate((args, kwargs),
                      lambda a: operands.append(a) if isinstance(a, torch.Tensor) else None)
        if key in self._by_storage or any(storage_key(t) == key for t in operands):
            return None  # the op returned (a view of) an operand: nothing to save
        depth = 1 + max((r.depth for r in map(self._recipe_of, operands) if r is not None),
                        default=0)
        if depth > MAX_RECIPE_DEPTH:
            return None

        def as_operand(item: Any) -> Any:
            recipe = self._recipe_of(item) if isinstance(item, torch.Tensor) else None
            return item if recipe is None else _View(recipe, item)

        if value.device not in self._autocast:
            self._autocast[value.device] = AutocastState(value.device)
        recipe = _Recipe(call, map_aggregate(args, as_operand),
                         map_aggregate(kwargs, as_operand), value, depth, hold,
                         self._autocast[value.device])
        self._by_storage[key] = recipe
        # forgotten when the value dies: its storage key may then name another storage, and
        # the recipe would keep its operands (a tile's regions) alive
        weakref.finalize(value, self._by_storage.pop, key, None)
        return recipe

    def _recipe_of(self, tensor: torch.Tensor) -> _Recipe | None:
        recipe = self._by_storage.get(storage_key(tensor)) if tensor.numel() else None
        if recipe is None or (tensor.dtype, tensor.device) != recipe.layout[3:]:
            return None
        return recipe

    @staticmethod
    def _view(recipe: _Recipe, tensor: torch.Tensor) -> _View:
        recipe.pending += 1
        return _View(recipe, tensor)

    @contextmanager
    def hooks(self) -> Iterator[None]:
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._recent = []

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        recipe = self._recipe_of(tensor)
        if recipe is not None:
            return _Saved(None, self._view(recipe, tensor))
        saved = _Saved(tensor, None)
        self._recent.append(saved)
        return saved

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        if saved.view is None:
            assert saved.tensor is not None
            return saved.tensor
        tensor = saved.view.tensor(keep=True)
        saved.view.recipe.unpacked()
        return tensor
