"""Attention pooling of the stream's output, tile by tile, with an online softmax.

Attention-based MIL pooling (Ilse et al. 2018; CLAM, Lu et al. 2021) weighs every position of
the feature map y (N, C', H', W') by a softmax over positions of logits an attention module
gives, per head k (K heads: K = 1 is CLAM-SB, one per class CLAM-MB):

    l = attention(y)                            (N, K, H', W'), any per-position module
    a[n, k, p] = exp(l[n, k, p]) / sum_q exp(l[n, k, q])      over masked positions q only
    pooled[n, k] = sum_p a[n, k, p] y[n, :, p]                (N, K, C')

Forward (`AttentionPool.add`): the online softmax of FlashAttention (Dao et al. 2022, after
Milakov and Gimelshein 2018) over tiles instead of keys. Per (n, k) it keeps the running
maximum logit m, the sum s = sum exp(l - m) and the weighted sum v = sum exp(l - m) y; a new
tile's maximum m' rescales both by exp(m - m'). At the end pooled = v / s and the log
normaliser log Z = m + log s, so a[p] = exp(l[p] - log Z). Nothing of the feature map's size
is kept: (N, K, C') numbers whatever the slide's area.

Backward (`AttentionPool.gradient`): with G = dL/dpooled (N, K, C'),

    dL/dy[p]   (through the weighted sum)  = sum_k a[k, p] G[k]
    dL/dl[k, p]                            = a[k, p] (G[k] . y[p] - G[k] . pooled[k])

Every position receives gradient, so every tile is re-run (the crop engine, the forward's
plan, as the average pooling's backward). A re-run block's output y is pushed through the
attention module with autograd, its logits' gradient above back-propagated to y and to the
attention's parameters, and the sum with the first term handed on as y's gradient. The
blocks partition the output, so the attention's parameter gradients add up exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from sstream.engine.saving import AutocastState, GradientSum
from sstream.engine.tiling import Box, OutputMask
from sstream.errors import InputError

if TYPE_CHECKING:
    from sstream.engine.streaming import TileRunner

WeightSink = Callable[[Box, torch.Tensor], None]
"""Receives (output box, attention weights (N, K, h, w)) block by block; zero off the mask."""


class AttentionPool:
    """The running attention pooling of one image's stream output, fed region by region.

    `add(box, region)` takes a region (N, C', h, w) at output box (y0, y1, x0, x1); regions
    must not overlap. Afterwards `values` (N, K, C') holds the pooled features and
    `log_normaliser` (N, K) log Z, from which `weights(box, logits)` gives the softmax weights
    of any block. Sums are kept in float64.
    """

    def __init__(self, attention: nn.Module, mask: OutputMask | None = None) -> None:
        self.attention, self.mask = attention, mask
        self._max: torch.Tensor | None = None  # (N, K) running maximum logit
        self._sum: torch.Tensor | None = None  # (N, K) sum of exp(l - max)
        self._weighted: torch.Tensor | None = None  # (N, K, C') sum of exp(l - max) y
        self._dtype: torch.dtype | None = None

    def logits(self, box: Box, region: torch.Tensor) -> torch.Tensor:
        """The attention logits (N, K, h, w) of an output region, -inf off the mask."""
        logits = self.attention(region)
        if logits.dim() != 4 or logits.shape[0] != region.shape[0] or \
                logits.shape[-2:] != region.shape[-2:]:
            raise InputError(f"the attention module must map a block (N, C', h, w) to logits "
                             f"(N, K, h, w), got {tuple(logits.shape)} for "
                             f"{tuple(region.shape)}")
        if self.mask is None:
            return logits
        return logits.masked_fill(~self.mask.block(box, logits.device), -torch.inf)

    def add(self, box: Box, region: torch.Tensor) -> None:
        if region.shape[-2] * region.shape[-1] == 0:
            return
        self._dtype = region.dtype
        logits = self.logits(box, region).flatten(2).double()  # (N, K, h*w)
        features = region.flatten(2).double()  # (N, C', h*w)
        tile_max = logits.amax(2)
        new_max = tile_max if self._max is None else torch.maximum(self._max, tile_max)
        shift = _finite_or_zero(new_max)  # -inf while no masked position was seen
        exp = torch.exp(logits - shift[..., None])  # (N, K, h*w), 0 off the mask
        tile_sum, tile_weighted = exp.sum(2), torch.einsum("nkp,ncp->nkc", exp, features)
        if self._max is None or self._sum is None or self._weighted is None:
            self._sum, self._weighted = tile_sum, tile_weighted
        else:
            rescale = torch.exp(self._max - shift)  # (N, K)
            self._sum = self._sum * rescale + tile_sum
            self._weighted = self._weighted * rescale[..., None] + tile_weighted
        self._max = new_max

    @property
    def pooled(self) -> torch.Tensor:
        """The pooled features (N, K, C') in float64."""
        assert self._sum is not None and self._weighted is not None, "no region was added"
        return self._weighted / self._sum[..., None]

    @property
    def values(self) -> torch.Tensor:
        """The pooled features (N, K, C') in the stream's dtype."""
        return self.pooled.to(self._dtype)

    @property
    def log_normaliser(self) -> torch.Tensor:
        """log Z (N, K) in float64: the softmax weight of a logit l is exp(l - log Z)."""
        assert self._max is not None and self._sum is not None, "no region was added"
        return self._max + torch.log(self._sum)

    def weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax weights (N, K, h, w) for a block's logits (0 where they are -inf)."""
        log_z = self.log_normaliser.to(logits.device)[..., None, None]
        return torch.exp(logits.double() - log_z).to(logits.dtype)

    def gradient(self, grad: torch.Tensor, params: Sequence[torch.Tensor],
                 autocast: AutocastState) -> AttentionGradient:
        """y's gradient block by block (and the attention parameters') for dL/dpooled."""
        return AttentionGradient(self, grad, params, autocast)


class AttentionGradient:
    """dL/dy for output blocks given their values, for pooled gradient G (N, K, C')
    (module docstring); the attention parameters' gradients are summed in `param_sums`.

    `block(box)` is None where the mask leaves the block out (nothing flows there), else a
    function of the block's output (N, C', h, w) giving its gradient: the engine calls it on
    the re-run output, so the block is computed once.
    """

    def __init__(self, pool: AttentionPool, grad: torch.Tensor,
                 params: Sequence[torch.Tensor], autocast: AutocastState) -> None:
        self.pool, self.grad, self.autocast = pool, grad, autocast
        self.param_sums = GradientSum(params)
        self.params = list(params)
        # (N, K): G[k] . pooled[k]
        self.centre = (grad.double() * pool.pooled.to(grad.device)).sum(-1)

    def block(self, box: Box) -> Callable[[torch.Tensor], torch.Tensor] | None:
        mask = self.pool.mask
        if mask is not None and not mask.any_in(box):
            return None
        return lambda output: self(box, output)

    def __call__(self, box: Box, output: torch.Tensor) -> torch.Tensor:
        features = output.detach().requires_grad_(True)
        with torch.enable_grad(), self.autocast():
            logits = self.pool.logits(box, features)  # (N, K, h, w)
        weights = self.pool.weights(logits.detach()).double()
        grad = self.grad.double().to(features.device)
        alignment = torch.einsum("nkc,nchw->nkhw", grad, features.detach().double())
        grad_logits = weights * (alignment - self.centre.to(features.device)[..., None, None])
        with self.param_sums.collecting():  # the attention's parameter gradients, summed
            through_logits = torch.autograd.grad(logits, [features, *self.params],
                                                 grad_logits.to(logits.dtype),
                                                 allow_unused=True)[0]
        direct = torch.einsum("nkhw,nkc->nchw", weights, grad)
        if through_logits is not None:  # else the logits do not depend on the features
            direct = direct + through_logits.double()
        # contiguous: torch's CPU batch norm backward (2.14) mis-sums gradients whose
        # strides are channels-last while its input's are not; einsum may give those
        return direct.to(output.dtype).contiguous()

    def run_forward_only(self, regions: Iterator[tuple[Box, torch.Tensor]]) -> None:
        """The attention's parameter gradients from the forward's regions, when nothing of
        the stream wants a gradient (a frozen trunk): no block needs a re-run with autograd."""
        for box, region in regions:
            if region.shape[-2] * region.shape[-1] and self.block(box) is not None:
                self(box, region)


class AttentionRun:
    """One image's attention pooling (`StreamingCNN.attention_pool`): the forward pools the
    output regions as they come; the backward re-runs every tile the mask needs."""

    def __init__(self, run: TileRunner, pool: AttentionPool) -> None:
        self.run, self.pool = run, pool
        self.attention_params = {id(p) for p in pool.attention.parameters()}

    def forward(self) -> torch.Tensor:
        """The pooled features (N, K, C'), computed without grad."""
        with torch.no_grad():
            for box, region in self.run.output_regions(self.pool.mask):
                self.pool.add(box, region)
        return self.pool.values

    def backward(self, grad: torch.Tensor, image_grad: torch.Tensor | None,
                 params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Gradients of `params` (stream's and attention's, in that order as given) and of
        the input (to `image_grad` / the sink) for dL/dpooled `grad` (N, K, C')."""
        ours = [p for p in params if id(p) in self.attention_params]
        theirs = [p for p in params if id(p) not in self.attention_params]
        gradient = self.pool.gradient(grad, ours, self.run.autocast)
        run = self.run
        if image_grad is None and run.sink is None and not theirs:
            gradient.run_forward_only(run.output_regions(self.pool.mask))
            stream_sums: list[torch.Tensor | None] = []
        elif image_grad is not None or run.sink is not None:
            stream_sums = run.crop_backward(gradient.block, image_grad, theirs)
        else:
            tiles = [t for t in run.plan if gradient.block(t.out_box) is not None]
            stream_sums = run.crop_backward(gradient.block, None, theirs, run.plan, tiles)
        sums = dict(zip(map(id, theirs), stream_sums))
        sums.update(zip(map(id, ours), gradient.param_sums.sums))
        return [sums[id(p)] for p in params]


class GatedAttention(nn.Module):
    """CLAM's gated attention (Ilse et al. 2018, sec. 2.4) as 1x1 convolutions, so that it
    runs on any block of the feature map: (N, C', h, w) -> logits (N, K, h, w),
    l = w . (tanh(V y) * sigmoid(U y)) per position."""

    def __init__(self, channels: int, hidden: int, heads: int = 1) -> None:
        super().__init__()
        self.value = nn.Conv2d(channels, hidden, 1)  # V
        self.gate = nn.Conv2d(channels, hidden, 1)  # U
        # w, without a bias: it would shift all of a head's logits alike, which the softmax
        # ignores (its gradient is zero)
        self.score = nn.Conv2d(hidden, heads, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        gated = torch.tanh(self.value(features)) * torch.sigmoid(self.gate(features))
        return self.score(gated)  # (N, K, h, w)


class AttentionPooling(nn.Module):
    """A head's attention pooling over the whole feature map: (N, C', H', W') -> (N, K, C').

    This is the plain-PyTorch reference; `StreamingCNN.attention_pool(image, self.attention)`
    gives the same numbers without the feature map. `mask` (bool (H', W') or (N, H', W'))
    restricts the softmax to True positions."""

    def __init__(self, channels: int, hidden: int, heads: int = 1) -> None:
        super().__init__()
        self.attention = GatedAttention(channels, hidden, heads)

    def weights(self, features: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The softmax weights (N, K, H', W') over positions (0 off the mask)."""
        logits = self.attention(features)  # (N, K, H', W')
        if mask is not None:
            keep = mask.to(logits.device, torch.bool)
            keep = keep if keep.dim() == 3 else keep.expand(logits.shape[0], *keep.shape)
            logits = logits.masked_fill(~keep[:, None], -torch.inf)
        return torch.softmax(logits.flatten(2), dim=2).view_as(logits)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        weights = self.weights(features, mask).flatten(2)  # (N, K, H'*W')
        # a broadcast product, not einsum (see tests/engine/test_attention.py's reference)
        return (weights[:, :, None, :] * features.flatten(2)[:, None]).sum(-1)  # (N, K, C')


def _finite_or_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


def attention_weight_blocks(run: TileRunner, pool: AttentionPool
                            ) -> Iterator[tuple[Box, torch.Tensor]]:
    """(output box, softmax weights (N, K, h, w)) for every region `run` gives, once `pool`
    has seen the whole output (its normaliser is final)."""
    with torch.no_grad():
        for box, region in run.output_regions(pool.mask):
            if region.shape[-2] * region.shape[-1]:
                yield box, pool.weights(pool.logits(box, region))
