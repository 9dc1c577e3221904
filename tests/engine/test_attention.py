"""Attention pooling (`StreamingCNN.attention_pool`) equals plain autograd.

The reference assembles the whole feature map, applies the attention module to it, takes the
softmax over (masked) positions and the weighted sum of the feature vectors; the loss is a
random linear function of the pooled (N, K, C'). Float64, relative error < 1e-9 for the pooled
values and the gradients of the stream, the attention module and the image.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import sstream
from tests.conftest import assert_autocast_matches_plain, relative_error
from tests.engine.helpers import assert_gradients_close, randomise_batchnorm
from tests.engine.test_exactness import architecture, output_exists
from tests.engine.test_pooling import count_reruns, random_mask
from tests.engine.test_tiling import RecordingSource, small_stream


class GatedAttention(nn.Module):
    """CLAM's gated attention as 1x1 convolutions: (N, C', h, w) -> (N, K, h, w). The score
    layers here have no bias: a bias shifts every logit of a head alike, which the softmax
    ignores, so its gradient is zero and both sides' numbers are rounding noise."""

    def __init__(self, channels: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.value = nn.Conv2d(channels, hidden, 1)
        self.gate = nn.Conv2d(channels, hidden, 1)
        self.score = nn.Conv2d(hidden, heads, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.score(torch.tanh(self.value(features)) * torch.sigmoid(self.gate(features)))


class LinearAttention(nn.Module):
    """A channels-last Linear layer applied at every position."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, heads, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_attention(kind: str, channels: int, heads: int) -> nn.Module:
    module = GatedAttention(channels, 5, heads) if kind == "gated" else \
        LinearAttention(channels, heads)
    for p in module.parameters():
        nn.init.normal_(p, std=0.7)
    return module.double()


def reference(stream: nn.Module, attention: nn.Module, image: torch.Tensor,
              mask: torch.Tensor | None, weights: torch.Tensor):
    """(pooled, softmax weights, image grad, parameter grads) of plain autograd."""
    for module in (stream, attention):
        module.zero_grad(set_to_none=True)
    leaf = image.detach().clone().requires_grad_(True)
    fmap = stream(leaf)  # (N, C', H', W')
    logits = attention(fmap)  # (N, K, H', W')
    if mask is not None:
        keep = mask if mask.dim() == 3 else mask.expand(fmap.shape[0], *mask.shape)
        logits = logits.masked_fill(~keep[:, None], -torch.inf)
    softmax = torch.softmax(logits.flatten(2), dim=2)  # (N, K, H'*W')
    # a broadcast product, not einsum: einsum's backward hands the feature map a gradient
    # with channels-last strides, which torch's CPU batch norm backward (2.14, eval mode)
    # mis-sums into its weight and bias (checked against finite differences)
    pooled = (softmax[:, :, None, :] * fmap.flatten(2)[:, None]).sum(-1)  # (N, K, C')
    (pooled * weights).sum().backward()
    return pooled.detach(), softmax.view_as(logits).detach(), leaf.grad.clone(), \
        gradients(stream, attention)


def gradients(stream: nn.Module, attention: nn.Module) -> dict[str, torch.Tensor]:
    named = [*(("stream." + n, p) for n, p in stream.named_parameters()),
             *(("attention." + n, p) for n, p in attention.named_parameters())]
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def streamed(scnn: sstream.StreamingCNN, attention: nn.Module,
             image: torch.Tensor | RecordingSource, mask: torch.Tensor | None,
             weights: torch.Tensor):
    for module in (scnn.stream, attention):
        module.zero_grad(set_to_none=True)
    leaf = image
    if isinstance(image, torch.Tensor):
        leaf = image.detach().clone().requires_grad_(True)
    pooled = scnn.attention_pool(leaf, attention, mask=mask)
    (pooled * weights).sum().backward()
    image_grad = leaf.grad if isinstance(leaf, torch.Tensor) else None
    return pooled.detach(), image_grad, gradients(scnn.stream, attention)


def assert_attention_exact(stream: nn.Module, attention: nn.Module, image: torch.Tensor, tile,
                           mask: torch.Tensor | None = None, engine: str = "auto",
                           lazy: bool = False, tolerance: float = 1e-9) -> None:
    with torch.no_grad():
        heads, channels = attention(stream(image[:1])).shape[1], stream(image[:1]).shape[1]
    weights = torch.randn(image.shape[0], heads, channels, dtype=image.dtype)
    want, want_softmax, want_image_grad, want_grads = reference(
        stream, attention, image, mask, weights)
    scnn = sstream.StreamingCNN(stream, tile, engine)
    source = RecordingSource(image) if lazy else image
    pooled, image_grad, grads = streamed(scnn, attention, source, mask, weights)
    assert pooled.shape == want.shape
    assert relative_error(pooled, want) < tolerance
    if image_grad is not None:
        assert relative_error(image_grad, want_image_grad) < tolerance
    assert_gradients_close(grads, want_grads, tolerance)
    assert_weights_equal(scnn, attention, image, mask, want_softmax, tolerance)


def assert_weights_equal(scnn: sstream.StreamingCNN, attention: nn.Module,
                         image: torch.Tensor, mask: torch.Tensor | None,
                         want: torch.Tensor, tolerance: float) -> None:
    """The streamed weight blocks, put together (0 where none came), equal the softmax."""
    assembled = torch.zeros_like(want)
    pooled, blocks = scnn.attention_weights(image, attention, mask)
    for (y0, y1, x0, x1), block in blocks:
        assembled[..., y0:y1, x0:x1] = block
    assert relative_error(assembled, want) < tolerance
    assert pooled.grad_fn is None


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
          deadline=None, max_examples=20)
@given(stream=architecture(), height=st.integers(5, 40), width=st.integers(5, 40),
       tile=st.tuples(st.integers(1, 40), st.integers(1, 40)), batch=st.integers(1, 2),
       heads=st.integers(1, 2), kind=st.sampled_from(["gated", "linear"]),
       masked=st.sampled_from([None, "shared", "each", "blob"]),
       engine=st.sampled_from(["auto", "auto", "crop"]), lazy=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_architectures_attention_pool_and_train_as_plain_autograd(
        stream, height, width, tile, batch, heads, kind, masked, engine, lazy, seed):
    assume(output_exists(stream, height, width))
    torch.manual_seed(seed)
    for p in stream.parameters():
        nn.init.normal_(p, std=0.5)
    image = torch.randn(batch, 2, height, width, dtype=torch.float64)
    with torch.no_grad():
        out = stream(image[:1])
    attention = make_attention(kind, out.shape[1], heads)
    mask = None
    if masked is not None:
        shape = tuple(out.shape[-2:]) if masked == "shared" else (batch, *out.shape[-2:])
        mask = random_mask(shape, torch.Generator().manual_seed(seed), masked == "blob")
    assert_attention_exact(stream, attention, image, tile, mask, engine, lazy)


def test_a_torchvision_trunk_attention_pools_and_trains_exactly():
    """ResNet-18's trunk, batch 2, gated attention with one head (CLAM-SB) from a lazily
    read image, and with two (CLAM-MB) and a mask."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    stream = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                           net.layer2).double().eval()
    randomise_batchnorm(stream, torch.Generator().manual_seed(1))
    image = torch.randn(2, 3, 130, 121, dtype=torch.float64)
    assert_attention_exact(stream, make_attention("gated", 128, 1), image, 64, lazy=True)
    with torch.no_grad():
        size = stream(image[:1]).shape[-2:]
    mask = random_mask((2, *size), torch.Generator().manual_seed(2))
    assert_attention_exact(stream, make_attention("gated", 128, 2), image, 64, mask)


def test_a_frozen_trunk_trains_the_attention_without_re_running_with_autograd():
    """Only the attention learns: its gradients come from the forward's regions again, and
    no tile of the stream is re-run with autograd."""
    stream = small_stream()
    for p in stream.parameters():
        p.requires_grad_(False)
    attention = make_attention("gated", 2, 2)
    image = torch.randn(2, 3, 90, 70, dtype=torch.float64)
    weights = torch.randn(2, 2, 2, dtype=torch.float64)
    want, _, _, want_grads = reference(stream, attention, image, None, weights)
    scnn = sstream.StreamingCNN(stream, 32)
    reruns = count_reruns(stream)
    pooled, _, grads = streamed(scnn, attention, RecordingSource(image), None, weights)
    assert not reruns
    assert relative_error(pooled, want) < 1e-9
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in want_grads.items():
        assert relative_error(grads[name], grad) < 1e-9


def test_extreme_logits_neither_overflow_nor_lose_the_small_weights():
    """Logits in the thousands: exp overflows without the running maximum."""
    stream = small_stream()
    attention = make_attention("linear", 2, 1)
    with torch.no_grad():
        attention.linear.weight.mul_(400.0)
    image = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    assert_attention_exact(stream, attention, image, 24)


def test_logits_of_the_wrong_shape_are_refused_in_one_line():
    stream = small_stream()
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    scnn = sstream.StreamingCNN(stream, 32)
    pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1)).double()  # not per position
    with pytest.raises(ValueError, match="logits") as error:
        scnn.attention_pool(image, pooling)
    assert "\n" not in str(error.value)


def test_cpu_autocast_attention_pools_and_trains_as_plain_autocast():
    """bf16 autocast on the CPU (`--amp`): the pooled features keep the autocast dtype and
    the stream's and the attention's gradients match plain autograd under the same
    autocast, with backward() outside the autocast region."""
    torch.manual_seed(8)
    stream = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Conv2d(4, 6, 3, 2, 1), nn.ReLU()).eval()
    attention = make_attention("gated", 6, 2).float()
    image = torch.randn(1, 3, 64, 56)
    weights = torch.randn(1, 2, 6)
    results = []
    for streamed_run in (False, True):
        stream.zero_grad()
        attention.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            if streamed_run:
                pooled = sstream.StreamingCNN(stream, 16).attention_pool(image, attention)
            else:
                fmap = stream(image)
                softmax = torch.softmax(attention(fmap).flatten(2), dim=2)
                pooled = (softmax[:, :, None, :] * fmap.flatten(2)[:, None]).sum(-1)
        (pooled.float() * weights).sum().backward()
        grads = [p.grad.clone() for p in [*stream.parameters(), *attention.parameters()]]
        results.append((pooled, grads))
    assert_autocast_matches_plain(results)
