"""Differentiable global pooling (`StreamingCNN.global_pool`) equals plain autograd.

The reference pools the whole feature map: `adaptive_max_pool2d` (positions off the mask at
-inf) or the mean over masked positions; the loss is a random linear function of the pooled
values. Float64, relative error < 1e-9 for the values, the maxima's indices, every parameter
gradient and the image gradient. Then what the issue promises beyond the numbers: blocks
whose gradient is zero are never re-run, tiles no masked output depends on are never read.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import sstream
from tests.conftest import assert_autocast_matches_plain, relative_error
from tests.engine.helpers import assert_gradients_close, randomise_batchnorm
from tests.engine.test_exactness import architecture, output_exists
from tests.engine.test_tiling import RecordingSource, small_stream


def reference(stream: nn.Module, image: torch.Tensor, mode: str, mask: torch.Tensor | None,
              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                              torch.Tensor, dict[str, torch.Tensor]]:
    """(values, indices, image grad, parameter grads) of plain autograd on the whole image."""
    stream.zero_grad(set_to_none=True)
    leaf = image.detach().clone().requires_grad_(True)
    fmap = stream(leaf)
    keep = None if mask is None else (
        mask if mask.dim() == 3 else mask.expand(fmap.shape[0], *mask.shape))[:, None]
    indices = None
    if mode == "max":
        masked = fmap if keep is None else fmap.masked_fill(~keep, -torch.inf)
        pooled, indices = F.adaptive_max_pool2d(masked, 1, return_indices=True)
        pooled, indices = pooled.flatten(1), indices.flatten(1)
    elif keep is None:
        pooled = fmap.mean((2, 3))
    else:
        pooled = (fmap * keep).sum((2, 3)) / keep.sum((2, 3))
    (pooled * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in stream.named_parameters() if p.grad is not None}
    return pooled.detach(), indices, leaf.grad.clone(), grads


def streamed(scnn: sstream.StreamingCNN, image: torch.Tensor | RecordingSource, mode: str,
             mask: torch.Tensor | None, weights: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                        dict[str, torch.Tensor]]:
    scnn.stream.zero_grad(set_to_none=True)
    leaf = image
    if isinstance(image, torch.Tensor):
        leaf = image.detach().clone().requires_grad_(True)
    values, indices = scnn.global_pool(leaf, mode, mask=mask)
    (values * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in scnn.stream.named_parameters()
             if p.grad is not None}
    image_grad = leaf.grad if isinstance(leaf, torch.Tensor) else None
    return values.detach(), indices, image_grad, grads


def assert_pooling_exact(stream: nn.Module, image: torch.Tensor, tile, mode: str,
                         mask: torch.Tensor | None = None, engine: str = "auto",
                         lazy: bool = False, tolerance: float = 1e-9) -> None:
    with torch.no_grad():
        channels = stream(image[:1]).shape[1]
    weights = torch.randn(image.shape[0], channels, dtype=image.dtype)
    want_values, want_indices, want_image_grad, want_grads = reference(
        stream, image, mode, mask, weights)
    scnn = sstream.StreamingCNN(stream, tile, engine)
    source = RecordingSource(image) if lazy else image
    values, indices, image_grad, grads = streamed(scnn, source, mode, mask, weights)
    assert relative_error(values, want_values) < tolerance
    if mode == "max":
        assert torch.equal(indices, want_indices)
    else:
        assert indices is None
    if image_grad is not None:
        assert relative_error(image_grad, want_image_grad) < tolerance
    assert_gradients_close(grads, want_grads, tolerance)


def random_mask(shape: tuple[int, ...], generator: torch.Generator, blob: bool = False
                ) -> torch.Tensor:
    """A mask with holes (about half of the positions), each image keeping at least one;
    with `blob`, only inside a random rectangle (most tiles then need not run)."""
    mask = torch.rand(shape, generator=generator) < 0.5
    if blob:
        height, width = shape[-2:]
        y0, x0 = (int(torch.randint(n, (1,), generator=generator)) for n in (height, width))
        y1 = y0 + 1 + int(torch.randint(max(1, height // 3), (1,), generator=generator))
        x1 = x0 + 1 + int(torch.randint(max(1, width // 3), (1,), generator=generator))
        outside = torch.ones(shape, dtype=torch.bool)
        outside[..., y0:y1, x0:x1] = False
        mask[outside] = False
    flat = mask.view(-1, shape[-2] * shape[-1])
    flat[:, 0] |= ~flat.any(1)
    return mask


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(stream=architecture(), height=st.integers(5, 70), width=st.integers(5, 70),
       tile=st.tuples(st.integers(1, 40), st.integers(1, 40)), batch=st.integers(1, 2),
       mode=st.sampled_from(["max", "avg"]),
       masked=st.sampled_from([None, "shared", "each", "blob"]),
       engine=st.sampled_from(["auto", "auto", "crop"]), lazy=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_architectures_pool_and_train_as_plain_autograd(
        stream, height, width, tile, batch, mode, masked, engine, lazy, seed):
    assume(output_exists(stream, height, width))
    torch.manual_seed(seed)
    for p in stream.parameters():
        nn.init.normal_(p, std=0.5)
    image = torch.randn(batch, 2, height, width, dtype=torch.float64)
    mask = None
    if masked is not None:
        with torch.no_grad():
            size = stream(image[:1]).shape[-2:]
        shape = tuple(size) if masked == "shared" else (batch, *size)
        mask = random_mask(shape, torch.Generator().manual_seed(seed), masked == "blob")
    assert_pooling_exact(stream, image, tile, mode, mask, engine, lazy)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_a_torchvision_trunk_pools_and_trains_exactly(mode):
    """ResNet-18's trunk (stem, residual stages, strided shortcuts), batch 2, with and
    without a mask, from a lazily read image."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    stream = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                           net.layer3).double().eval()
    randomise_batchnorm(stream, torch.Generator().manual_seed(1))
    image = torch.randn(2, 3, 150, 133, dtype=torch.float64)
    assert_pooling_exact(stream, image, 48, mode, lazy=True)
    with torch.no_grad():
        size = stream(image[:1]).shape[-2:]
    mask = random_mask((2, *size), torch.Generator().manual_seed(2))
    assert_pooling_exact(stream, image, 48, mode, mask)


def test_ties_resolve_to_the_first_position_across_tiles():
    """ReLU zeros tie everywhere: the whole gradient goes to the first position in row-major
    order over the whole output, not to the first tile's."""
    stream = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).double()
    with torch.no_grad():
        stream[0].weight.zero_()
        stream[0].bias.copy_(torch.tensor([-1.0, 0.0]))  # channel 0 all zeros after ReLU
    image = torch.zeros(1, 1, 40, 40, dtype=torch.float64)
    image[0, 0, 30, 2] = image[0, 0, 4, 34] = 5.0
    assert_pooling_exact(stream, image, 16, "max")


def test_without_trainable_parameters_or_grad_nothing_is_recorded():
    stream = small_stream()
    image = torch.randn(1, 3, 50, 50, dtype=torch.float64)
    for p in stream.parameters():
        p.requires_grad_(False)
    values, _ = sstream.StreamingCNN(stream, 16).global_pool(image, "max")
    assert values.grad_fn is None
    for p in stream.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        values, _ = sstream.StreamingCNN(stream, 16).global_pool(image, "max")
    assert values.grad_fn is None


def count_reruns(stream: nn.Module) -> list[int]:
    """Input pixels of every run of `stream`'s first layer with autograd (the backward's
    re-runs; the forward runs without grad), appended as they happen."""
    pixels: list[int] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled() and not inputs[0].is_meta:
            pixels.append(inputs[0].shape[-2] * inputs[0].shape[-1])

    stream[0].register_forward_pre_hook(record)
    return pixels


def test_blocks_whose_gradient_is_zero_are_never_re_run():
    """A loss on one channel's maximum re-runs one block per image holding that maximum, a
    block smaller than a forward tile, and reads only its crop again."""
    stream = small_stream()
    reruns = count_reruns(stream)
    image = torch.randn(2, 3, 160, 144, dtype=torch.float64)
    scnn = sstream.StreamingCNN(stream, 32, engine="crop")
    source = RecordingSource(image)
    values, indices = scnn.global_pool(source, "max")
    forward_reads = len(source.boxes)
    assert forward_reads == len(scnn.plan(image.shape)) and not reruns
    values[:, 1].sum().backward()  # channel 1 only: two positions, one per image
    positions = {int(i) for i in indices[:, 1]}
    assert len(reruns) == len(source.boxes) - forward_reads == len(positions)
    largest = scnn.plan(image.shape).largest_crop
    assert max(reruns) < largest[0] * largest[1]
    weights = torch.zeros(2, values.shape[1], dtype=torch.float64)
    weights[:, 1] = 1
    _, _, _, want = reference(stream, image, "max", None, weights)
    for name, p in stream.named_parameters():
        assert relative_error(p.grad, want[name]) < 1e-9


def test_the_halo_forward_reads_each_input_pixel_once():
    """Without a mask the forward is the halo engine: every input region read once, no
    overlap (the crop engine would read every receptive-field margin again)."""
    stream = small_stream()
    image = torch.randn(1, 3, 97, 83, dtype=torch.float64)
    source = RecordingSource(image)
    with torch.no_grad():
        sstream.StreamingCNN(stream, 24).global_pool(source, "avg")
    read = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in source.boxes)
    assert read == 97 * 83


@pytest.mark.parametrize("engine", ["auto", "crop"])
def test_tiles_no_masked_output_depends_on_are_never_read(engine):
    """A blob of tissue in one corner: every region read lies within the receptive field of
    a masked output, far fewer pixels are read than the image has, and the result is exact."""
    torch.manual_seed(3)
    stream = small_stream()
    image = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        out_h, out_w = stream(image).shape[-2:]
    mask = torch.zeros(out_h, out_w, dtype=torch.bool)
    mask[3:9, 4:11] = True
    mask[5, 6] = False  # a hole
    scnn = sstream.StreamingCNN(stream, 32, engine)
    source = RecordingSource(image)
    weights = torch.randn(1, 2, dtype=torch.float64)
    values, _, _, grads = streamed(scnn, source, "max", mask, weights)
    window = scnn.geometry.axis(0)  # square kernels: the same on both axes
    rows, cols = mask.nonzero(as_tuple=True)
    lo = int(rows.min()) * window.stride - window.lo
    hi = int(rows.max()) * window.stride + window.hi + 1
    left = int(cols.min()) * window.stride - window.lo
    right = int(cols.max()) * window.stride + window.hi + 1
    assert source.boxes
    for y0, y1, x0, x1 in source.boxes:  # every read overlaps what masked outputs see
        assert y0 < hi and y1 > lo and x0 < right and x1 > left, (y0, y1, x0, x1)
    read = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in source.boxes)
    assert read < 256 * 256 / 3
    want_values, _, _, want_grads = reference(stream, image, "max", mask, weights)
    assert relative_error(values, want_values) < 1e-9
    for name, grad in want_grads.items():
        assert relative_error(grads[name], grad) < 1e-9


def test_masks_that_cannot_work_are_refused_in_one_line():
    stream = small_stream()
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    scnn = sstream.StreamingCNN(stream, 32)
    size = scnn.output_size(image.shape)
    with pytest.raises(ValueError, match="selects no output position"):
        scnn.global_pool(image, "max", mask=torch.zeros(size, dtype=torch.bool))
    each = torch.ones((2, *size), dtype=torch.bool)
    each[1] = False
    with pytest.raises(ValueError, match=r"batch element \[1\] selects no output position"):
        scnn.global_pool(image, "avg", mask=each)
    with pytest.raises(ValueError, match=r"does not match the stream's output: expected "):
        scnn.global_pool(image, "max", mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        scnn.global_pool(image, "max", mask=torch.ones(size))
    with pytest.raises(ValueError, match="mode must be 'max' or 'avg'"):
        scnn.global_pool(image, "mean")


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_cpu_autocast_pools_and_trains_as_plain_autocast(mode):
    """bf16 autocast on the CPU (`--amp`): the pooled values keep the autocast dtype and the
    gradients match plain autograd under the same autocast, also when backward() runs
    outside the autocast region."""
    torch.manual_seed(8)
    stream = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Conv2d(4, 6, 3, 2, 1), nn.ReLU()).eval()
    image = torch.randn(1, 3, 64, 56)
    weights = torch.randn(1, 6)
    results = []
    for streamed_run in (False, True):
        stream.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            if streamed_run:
                values, _ = sstream.StreamingCNN(stream, 16).global_pool(image, mode)
            else:
                fmap = stream(image)
                values = (F.adaptive_max_pool2d(fmap, 1) if mode == "max"
                          else F.adaptive_avg_pool2d(fmap, 1)).flatten(1)
        (values.float() * weights).sum().backward()
        results.append((values, [p.grad.clone() for p in stream.parameters()]))
    assert_autocast_matches_plain(results)
