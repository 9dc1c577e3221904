"""What a streamed training step keeps in memory (bytes of live tensors, not timings)."""

from __future__ import annotations

import weakref

import pytest
import torch
import torchvision
from torch import nn

import sstream
from sstream.engine.memory import LiveBytes
from sstream.engine.saving import Recipes
from tests.conftest import relative_error


def conv_bn_relu_stream() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(3):
        layers += [nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        channels = 16
    layers.append(nn.Conv2d(16, 8, 4, stride=4))  # a small feature map: activations dominate
    return nn.Sequential(*layers).double().eval()


def step_peak(stream: nn.Module, image: torch.Tensor, tile: int | None) -> tuple[int, list]:
    """Peak live bytes of one training step, and the parameter gradients it left."""
    trunk: nn.Module = stream
    if tile is not None:  # planned first: planning runs on the meta device
        trunk = sstream.StreamingCNN(stream, tile)
        assert trunk.engine_for(image.shape) == "halo"
    stream.zero_grad(set_to_none=True)
    with LiveBytes((image, *stream.parameters(), *stream.buffers())) as live:
        trunk(image).square().sum().backward()
    return live.peak, [p.grad for p in stream.parameters()]


def assert_exact_and_below(stream: nn.Module, image: torch.Tensor, tile: int,
                           divisor: float) -> None:
    """A streamed step peaks below plain PyTorch's peak / `divisor`, with the same
    gradients."""
    plain, expected = step_peak(stream, image, None)
    streamed, grads = step_peak(stream, image, tile)
    assert streamed < plain / divisor
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < 1e-10


def test_four_tiles_keep_less_than_a_quarter_of_plain_memory():
    """With 2 x 2 tiles a conv-BN-ReLU stack peaks below a quarter of plain PyTorch: the
    tile's re-run keeps each layer's convolution output only and recomputes BatchNorm and
    ReLU in the backward (plain keeps both; keeping both, streaming peaked at 1/3.3). The
    gradients stay exact."""
    stream = conv_bn_relu_stream()
    assert_exact_and_below(stream, torch.randn(1, 3, 128, 128, dtype=torch.float64), 64, 4)


def stem_stream() -> nn.Sequential:
    """A ResNet-like stem (7x7 stride-2 conv, BN, ReLU, max pool) and one more layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 7, 2, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 4, stride=4)).double().eval()


def test_stem_output_is_recomputed_from_the_image():
    """The first convolution reads the image, which a tile keeps anyway: its output (the
    largest activation) is recomputed in the backward, and a value recomputed only as an
    ingredient of another is not held until its own turn. Four tiles then peak below a third
    of plain PyTorch (keeping the stem's output, or holding it between its uses, 1/2.7)."""
    stream = stem_stream()
    assert_exact_and_below(stream, torch.randn(1, 3, 256, 256, dtype=torch.float64), 128, 3)


def test_backward_frees_the_kept_strips_as_it_goes():
    """The halo strips a tile row kept for the backward are freed once that row is done: by
    the last tile, live memory has fallen by more than half of all strips (the gradient line
    buffer handed upwards is one row's worth). A second backward is refused clearly."""
    stream = conv_bn_relu_stream()
    image = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    scnn = sstream.StreamingCNN(stream, 64)
    strips = scnn.saved_halo_elements(image.shape) * image.element_size()
    live_at: dict[str, list[int]] = {"forward": [], "backward": []}
    with LiveBytes((image, *stream.parameters(), *stream.buffers())) as live:
        scnn.on_tile = lambda phase, done, total: live_at[phase].append(live.current)
        loss = scnn(image).square().sum()
        loss.backward(retain_graph=True)
    backward = live_at["backward"]
    assert len(backward) == 16 and strips > 0
    assert backward[-1] < backward[0] - strips / 2, (backward, strips)
    with pytest.raises(RuntimeError, match="back-propagated before"):
        loss.backward()


def test_recipes_forget_a_value_once_it_dies():
    """A recipe holds its operands. Once the value it recomputes is gone (and no saved tensor
    refers to it), the recipe and its operands must go too, or a tile's regions stay alive
    through its whole backward (ResNet-18 at 1024 px, tile 256: 109 -> 199 MB)."""
    recipes = Recipes()
    operand = torch.randn(8, 8)
    value = operand * 2
    recipes.note(value, lambda args, kwargs: args[0] * 2, (operand,), {})
    operand_alive = weakref.ref(operand)
    del operand, value
    assert operand_alive() is None


def test_resnet18_step_keeps_a_fraction_of_plain_memory():
    """ResNet-18 (float32) at 384 px with 4 x 4 tiles: the peak of a streamed step stays
    below 2/3 of plain PyTorch's, parameter gradients included (measured 1/1.65; keeping
    recipes of dead values alive gave 1/1.28). Exactness is checked in test_trunks."""
    torch.manual_seed(0)
    stream = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2]).eval()
    image = torch.rand(1, 3, 384, 384)
    plain, _ = step_peak(stream, image, None)
    streamed, _ = step_peak(stream, image, 96)
    assert streamed < plain / 1.5, (streamed / 2**20, plain / 2**20)


@pytest.mark.parametrize("tile, convolutions_per_tile", [(128, 3), (16, 2)])
def test_recomputation_is_left_out_where_it_saves_little(monkeypatch, tile,
                                                          convolutions_per_tile):
    """A tile's backward recomputes values only where that saves at least 1/16 of the
    feature map. A 1x1 convolution and ReLU: in one tile the tile's values are twice the
    feature map, and the backward recomputes the convolution (forward, re-run, recompute: 3
    per tile); in 16 px tiles each holds 1/64 of it, and recomputing would only cost time (2
    per tile). The gradients are exact either way."""
    torch.manual_seed(0)
    stream = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU()).double()
    image = torch.randn(1, 3, 128, 128, dtype=torch.float64, requires_grad=True)
    stream(image).square().sum().backward()
    expected = [image.grad, *(p.grad for p in stream.parameters())]
    image.grad = None
    stream.zero_grad(set_to_none=True)
    scnn = sstream.StreamingCNN(stream, tile)
    assert scnn.engine_for(image.shape) == "halo"
    calls = []
    convolution = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda *args, **kwargs: calls.append(1) or convolution(*args, **kwargs))
    scnn(image).square().sum().backward()
    assert len(calls) == convolutions_per_tile * (128 // tile) ** 2
    for got, want in zip([image.grad, *(p.grad for p in stream.parameters())], expected):
        assert relative_error(got, want) < 1e-10
