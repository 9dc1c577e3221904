"""Run a stream streamed and conventionally; collect outputs and every gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import sstream


@dataclass
class Result:
    output: torch.Tensor
    image_grad: torch.Tensor
    param_grads: dict[str, torch.Tensor]


def run_with_grads(stream: nn.Module, image: torch.Tensor, weights: torch.Tensor,
                   tile_size: int | tuple[int, int] | None, engine: str = "auto") -> Result:
    """Loss = sum(output * weights); tile_size None runs plain autograd on the whole image."""
    stream.zero_grad(set_to_none=True)
    leaf = image.detach().clone().requires_grad_(True)
    model = stream
    if tile_size is not None:
        model = sstream.StreamingCNN(stream, tile_size, engine)
    output = model(leaf)
    (output * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in stream.named_parameters()
             if p.grad is not None}
    return Result(output.detach(), leaf.grad.detach().clone(), grads)


def randomise_batchnorm(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.randn(n, generator=generator))
                m.bias.copy_(torch.randn(n, generator=generator))


def assert_streaming_exact(stream: nn.Module, image: torch.Tensor, tile_size,
                           tolerance: float = 1e-9, engine: str = "auto") -> None:
    """Output, image gradient and every parameter gradient match plain autograd.

    engine "auto" streams with halos where the stream allows it (else crops), "crop" with
    crops, "halo" insists on halos."""
    from tests.conftest import relative_error

    with torch.no_grad():
        reference_shape = stream(image).shape
    weights = torch.randn(reference_shape, dtype=image.dtype)
    expected = run_with_grads(stream, image, weights, None)
    actual = run_with_grads(stream, image, weights, tile_size, engine)
    assert actual.output.shape == expected.output.shape
    assert relative_error(actual.output, expected.output) < tolerance
    assert relative_error(actual.image_grad, expected.image_grad) < tolerance
    assert_gradients_close(actual.param_grads, expected.param_grads, tolerance)


def assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                           tolerance: float) -> None:
    """The same parameters have gradients, each within `tolerance` (relative), named if not."""
    from tests.conftest import relative_error

    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        error = relative_error(actual[name], grad)
        assert error < tolerance, f"gradient of {name}: relative error {error:.3g}"
