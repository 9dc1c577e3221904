"""Streaming equals plain autograd on the whole image, for random local architectures.

Random stacks of convolutions (any kernel, stride 1-3, dilation, padding 0 / k//2 / larger
than the kernel, groups), pooling (max/avg, padding, ceil_mode), BatchNorm in eval mode,
activations, residual blocks with strided shortcuts and concatenation blocks; random image
sizes that are multiples of nothing, random tile sizes. Float64, relative error < 1e-9.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import sstream
from tests.conftest import assert_autocast_matches_plain
from tests.engine.helpers import assert_streaming_exact, randomise_batchnorm


class Residual(nn.Module):
    """conv-BN-ReLU-conv plus a shortcut (identity, or 1x1 conv with the same stride)."""

    def __init__(self, channels: int, kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel, stride, pad, dilation),
            nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, kernel, 1, pad, dilation),
        )
        self.shortcut = (nn.Identity() if stride == 1
                         else nn.Conv2d(channels, channels, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Concat(nn.Module):
    """Two branches with different kernels (same stride), concatenated along channels."""

    def __init__(self, channels: int, k1: int, k2: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, k1, stride, k1 // 2)
        self.b = nn.Sequential(nn.Conv2d(channels, channels, k2, stride, k2 // 2), nn.GELU())
        self.merge = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.a(x), self.b(x)], dim=1))


@st.composite
def layer(draw: st.DrawFn, channels: int) -> nn.Module:
    kind = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool", "residual", "concat",
                                 "bn", "act"]))
    if kind == "conv":
        k = draw(st.integers(1, 5))
        dilation = draw(st.integers(1, 2))
        extent = dilation * (k - 1) + 1
        padding = draw(st.sampled_from([0, extent // 2, draw(st.integers(0, extent + 1))]))
        groups = draw(st.sampled_from([1, channels]))
        return nn.Conv2d(channels, channels, k, draw(st.integers(1, 3)), padding, dilation,
                         groups=groups, bias=draw(st.booleans()))
    if kind in ("maxpool", "avgpool"):
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 3))
        padding = draw(st.integers(0, k // 2))
        ceil_mode = draw(st.booleans())
        if kind == "maxpool":
            return nn.MaxPool2d(k, stride, padding, dilation=draw(st.integers(1, 2)),
                                ceil_mode=ceil_mode)
        return nn.AvgPool2d(k, stride, padding, ceil_mode=ceil_mode,
                            count_include_pad=draw(st.booleans()))
    if kind == "residual":
        return Residual(channels, draw(st.sampled_from([1, 3, 5])), draw(st.integers(1, 2)),
                        draw(st.integers(1, 2)))
    if kind == "concat":
        return Concat(channels, draw(st.sampled_from([1, 3])), draw(st.sampled_from([3, 5])),
                      draw(st.integers(1, 2)))
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    return draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.1), nn.SiLU(), nn.Tanh()]))


@st.composite
def architecture(draw: st.DrawFn) -> nn.Module:
    channels = draw(st.integers(1, 3))
    layers = [nn.Conv2d(2, channels, draw(st.integers(1, 3)), 1, 1)]
    layers += draw(st.lists(layer(channels), min_size=1, max_size=6))
    stream = nn.Sequential(*layers).double().eval()
    randomise_batchnorm(stream, torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return stream


def output_exists(stream: nn.Module, height: int, width: int) -> bool:
    """Whether the whole image is large enough for the architecture, with finite outputs
    (a max-pool window lying wholly in padding gives -inf, whose gradients are NaN)."""
    try:
        with torch.no_grad():
            return bool(torch.isfinite(stream(torch.zeros(1, 2, height, width,
                                                          dtype=torch.float64))).all())
    except RuntimeError:
        return False


@settings(suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.filter_too_much])
@given(stream=architecture(), height=st.integers(5, 70), width=st.integers(5, 70),
       tile=st.tuples(st.integers(1, 40), st.integers(1, 40)), batch=st.integers(1, 2),
       seed=st.integers(0, 2**16), engine=st.sampled_from(["auto", "auto", "crop"]))
def test_random_architectures_match_plain_autograd(stream, height, width, tile, batch, seed,
                                                   engine):
    assume(output_exists(stream, height, width))
    torch.manual_seed(seed)
    for p in stream.parameters():
        nn.init.normal_(p, std=0.5)
    image = torch.randn(batch, 2, height, width, dtype=torch.float64)
    assert_streaming_exact(stream, image, tile, engine=engine)


def test_hand_picked_traps():
    """Cases that broke earlier implementations: misaligned sizes, ceil_mode, big padding."""
    torch.manual_seed(0)
    stream = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU6(),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        nn.Conv2d(4, 4, 3, 1, padding=4),             # padding larger than the kernel extent
        nn.AvgPool2d(2, 3, ceil_mode=True),           # stride larger than kernel
        nn.Conv2d(4, 5, 3, 1, padding=2, dilation=2),
    ).double().eval()
    randomise_batchnorm(stream)
    # padding larger than a kernel makes outputs that see only padding: crops (see below)
    halo_stream = nn.Sequential(*stream[:4], nn.Conv2d(4, 4, 3, 1, padding=2),
                                *stream[5:]).double()
    for size in [(97, 131), (64, 64), (33, 200)]:
        image = torch.randn(1, 3, *size, dtype=torch.float64)
        for tile in [12, 24, 50]:
            assert_streaming_exact(stream, image, tile, engine="auto")
            assert_streaming_exact(halo_stream, image, tile, engine="halo")
    assert_streaming_exact(stream, torch.randn(1, 3, 97, 131, dtype=torch.float64), 24,
                           engine="crop")


def test_non_square_kernels_and_same_padding():
    torch.manual_seed(1)
    stream = nn.Sequential(
        nn.Conv2d(2, 3, (1, 5), (1, 2), (0, 2)), nn.GELU(),
        nn.Conv2d(3, 3, (4, 2), 1, padding="same"),
        nn.Conv2d(3, 3, 3, (2, 1), padding="valid"),
    ).double().eval()
    assert_streaming_exact(stream, torch.randn(2, 2, 57, 61, dtype=torch.float64), (16, 10))


def test_batch_of_images_and_no_image_grad():
    """N > 1; and an input that does not require grad still trains the parameters."""
    torch.manual_seed(2)
    stream = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1))
    stream = stream.double()
    image = torch.randn(3, 3, 45, 38, dtype=torch.float64)
    out = sstream.StreamingCNN(stream, 8)(image)
    out.square().sum().backward()
    streamed = [p.grad.clone() for p in stream.parameters()]
    stream.zero_grad()
    stream(image).square().sum().backward()
    for got, want in zip(streamed, [p.grad for p in stream.parameters()]):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_torch_autograd_grad_and_no_grad():
    """Autograd-native: torch.autograd.grad works, and under no_grad no graph is built."""
    torch.manual_seed(3)
    stream = nn.Sequential(nn.Conv2d(1, 2, 3, 1, 1), nn.Tanh(), nn.MaxPool2d(2)).double()
    scnn = sstream.StreamingCNN(stream, 6)
    image = torch.randn(1, 1, 21, 17, dtype=torch.float64, requires_grad=True)
    (grad_image,) = torch.autograd.grad(scnn(image).sum(), [image])
    (expected,) = torch.autograd.grad(stream(image).sum(), [image])
    assert torch.allclose(grad_image, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert scnn(image).grad_fn is None


class ReadsAfterInPlace(nn.Module):
    """An in-place op on a value that is read again afterwards (it sees the mutation)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        z = y.relu_()
        return self.b(z) + y


def test_in_place_ops_on_shared_values_fall_back_to_crops():
    torch.manual_seed(4)
    stream = ReadsAfterInPlace().double()
    image = torch.randn(1, 2, 41, 37, dtype=torch.float64)
    assert sstream.StreamingCNN(stream, 8).engine_for(image.shape) == "crop"
    assert_streaming_exact(stream, image, 8)
    with pytest.raises(ValueError, match="engine='halo' cannot run this stream"):
        sstream.StreamingCNN(stream, 8, engine="halo")(image)
    with pytest.raises(ValueError, match="unknown engine 'halos'; valid: auto, halo, crop"):
        sstream.StreamingCNN(stream, 8, engine="halos")


def test_in_place_ops_on_sole_readers_use_halos():
    """ReLU(inplace=True) and `out += identity` as in torchvision's ResNet."""
    torch.manual_seed(5)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv2(self.relu(self.conv1(x)))
            out += x
            return self.relu(out)

    stream = nn.Sequential(nn.Conv2d(2, 2, 3, 2, 1), Block(), nn.MaxPool2d(3, 2, 1)).double()
    image = torch.randn(2, 2, 53, 47, dtype=torch.float64)
    assert sstream.StreamingCNN(stream, 10).engine_for(image.shape) == "halo"
    assert_streaming_exact(stream, image, 10, engine="halo")
    assert stream[1].relu.inplace  # the engine restores the module's flag


class ScalesItsInput(nn.Module):
    """Mutates its input in place before the first convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x.mul_(2)))


def test_in_place_ops_run_on_copies_of_the_image_and_as_written_elsewhere():
    """Without autograd the halo engine runs in-place ops in place (as plain PyTorch does),
    except on the caller's image: tiles that mutate their view of it would leave it half
    scaled, and an op applied twice where halos overlap would be wrong."""
    torch.manual_seed(7)
    stream = ScalesItsInput().double()
    image = torch.randn(1, 2, 29, 31, dtype=torch.float64)
    original = image.clone()
    expected = stream(image.clone())
    scnn = sstream.StreamingCNN(stream, 8, engine="halo")
    with torch.no_grad():
        assert torch.allclose(scnn(image), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(image, original)
    weights = torch.randn(expected.shape, dtype=image.dtype)
    (weights * stream(image.clone())).sum().backward()
    expected_grads = [p.grad.clone() for p in stream.parameters()]
    stream.zero_grad()
    (weights * scnn(image)).sum().backward()
    assert torch.equal(image, original)
    for grad, want in zip((p.grad for p in stream.parameters()), expected_grads, strict=True):
        assert torch.allclose(grad, want, rtol=1e-10, atol=1e-12)


def test_padding_as_large_as_the_kernel_uses_crops_exactly():
    """Found by the hypothesis hunt: outputs that see only padding crashed the halo engine."""
    torch.manual_seed(6)
    stream = nn.Sequential(nn.Conv2d(2, 1, 1, 1, 1), nn.Conv2d(1, 1, 1, bias=False),
                           nn.Conv2d(1, 1, 1, 3, bias=False),
                           nn.Conv2d(1, 1, 1, 3, 2, bias=False)).double()
    image = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert sstream.StreamingCNN(stream, 1).engine_for(image.shape) == "crop"
    assert_streaming_exact(stream, image, 1)


def test_border_outputs_that_see_only_padding_get_a_crop_valid_for_every_layer():
    """Found by the hypothesis hunt: the last crop was too short for a dilated conv whose
    outputs a later layer's padding extends."""
    torch.manual_seed(7)
    stream = nn.Sequential(nn.Conv2d(2, 1, 1, 1, 1), nn.Conv2d(1, 1, 1, bias=False),
                           nn.Conv2d(1, 1, 3, dilation=2, bias=False),
                           nn.Conv2d(1, 1, 1, padding=2, bias=False)).double()
    assert_streaming_exact(stream, torch.randn(1, 2, 5, 5, dtype=torch.float64), 1)


def test_cpu_autocast_is_kept_by_the_recomputed_values():
    """The backward re-runs tiles and recomputes saved values under the forward's autocast
    state, also when `backward()` is called outside the autocast region (as recommended):
    a value recomputed in float32 would have another layout than in the forward pass."""
    torch.manual_seed(8)
    stream = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU()).eval()
    image = torch.randn(1, 3, 40, 36)
    weights = torch.randn(1, 4, 20, 18)
    results = []
    for model in (stream, sstream.StreamingCNN(stream, 16, engine="halo")):
        stream.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            output = model(image)
        (output.float() * weights).sum().backward()
        results.append((output, [p.grad.clone() for p in stream.parameters()]))
    assert_autocast_matches_plain(results)


def test_strided_pointwise_convolutions_sample_their_crop_exactly(monkeypatch):
    """A strided 1x1 convolution without padding (ResNet's downsample) runs with stride 1 on
    every s-th pixel of its crop; anisotropic strides and crops at odd offsets included."""
    import sstream.engine.halo_run as halo

    calls = []
    sampled = halo._sampled_conv
    monkeypatch.setattr(halo, "_sampled_conv", lambda *args: calls.append(1) or sampled(*args))
    torch.manual_seed(9)
    stream = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(3, 4, 1, stride=(2, 3)), nn.ReLU(),
                           nn.Conv2d(4, 2, 3, padding=1)).double()
    assert_streaming_exact(stream, torch.randn(1, 2, 47, 53, dtype=torch.float64), 9,
                           engine="halo")
    assert calls
