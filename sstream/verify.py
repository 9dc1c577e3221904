"""The `sstream verify` job: one training step, conventionally and streamed, side by side.

What the paper's notebooks let a reader see, for one's own model and image size: the model
is built (`build_model`, BatchNorm frozen as training freezes it, dropout off), and one
training step (forward, head, cross-entropy, backward) runs twice on the same input: plain
PyTorch on the whole image, and streamed as `sstream train` runs it (`streamed_logits`: the
whole-slide path for pooling heads, else the feature map). Compared: the logits, the input
gradient and every parameter gradient, as max |streamed - plain| / max |plain|; the time and
the peak of live tensor bytes (CPU: `LiveBytes`; CUDA: max_memory_allocated) of each.

Where conventional training would not fit (its estimated peak above the memory available),
it runs on the largest centred crop whose estimate fits, and says so: the comparison is the
same question on less image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sstream.engine import StreamingCNN
from sstream.engine.memory import LiveBytes, estimate_training_memory
from sstream.errors import InputError
from sstream.models import (
    Classifier,
    ModelConfig,
    build_model,
    freeze_batchnorm,
    streamed_logits,
    training_path,
)
from sstream.options import ASSUME_MPP_HELP, DEVICE_HELP, Options, option
from sstream.reading import ReadSpec
from sstream.runtime import resolve_device

__all__ = ["TOLERANCES", "Verification", "VerifyConfig", "verify"]

TOLERANCES = {"float64": 1e-9, "float32": 1e-4}  # max relative error accepted
MEMORY_SHARE = 0.8  # of the memory available, what the conventional step may take



@dataclass
class VerifyConfig(Options):
    """Options of `sstream verify`: their defaults and help."""

    model: str = option("resnet18", "Model name (see train --model).")
    image_size: tuple[int, int] = option(  # (height, width); an image's centre at this size
        (1024, 1024), "Input size: N (square) or WxH.")
    tile_size: int = option(512, "Streaming tile side in pixels.")
    stream_layers: str | None = option(None, "Stream up to this stage (as for train).",
                                       shown="the whole trunk")
    dtype: str = option("float64", "float64 (exactness, tolerance 1e-9) or float32 "
                        "(tolerance 1e-4).")
    weights: str | None = option(None, "torchvision-format backbone weights, as for train.")
    image: str | None = option(None, "A slide or image (its centre at --image-size) instead "
                               "of random pixels.")
    device: str = option("auto", DEVICE_HELP)
    seed: int = option(0, "Seed of the random pixels.")
    level: int | None = option(None, "--image: the pyramid level to read.", shown="0")
    mpp: float | None = option(None, "--image: read at exactly this many µm per pixel.")
    assume_mpp: float | None = option(None, ASSUME_MPP_HELP)
    pooling: str = option("max", "The head's pooling, as for train: max, avg or attention.")

    def validate(self) -> None:
        """ValueError for options that cannot work."""
        if self.dtype not in TOLERANCES:
            raise InputError(f"--dtype must be one of {', '.join(TOLERANCES)}, got "
                             f"{self.dtype!r}")
        if min(self.image_size) <= 0 or self.tile_size <= 0:
            raise InputError("--image-size and --tile-size must be positive")

    def read_spec(self) -> ReadSpec:
        """How `image` is read (level or mpp; the tissue is not used)."""
        return ReadSpec(self.level, self.mpp, self.assume_mpp)


@dataclass
class Verification:
    """What `verify` compared. Errors are max |streamed - plain| / max |plain|."""

    model: str
    stream_layers: str | None
    size: tuple[int, int]              # (height, width) asked for
    verified_size: tuple[int, int]     # (height, width) compared (a crop where too large)
    tile_size: tuple[int, int]
    dtype: str
    device: str
    path: str                          # "whole-slide" or "feature map"
    tolerance: float
    output_error: float
    input_grad_error: float
    param_errors: dict[str, float] = field(default_factory=dict)
    seconds: tuple[float, float] = (0.0, 0.0)        # (conventional, streamed)
    peak_bytes: tuple[int, int] = (0, 0)             # (conventional, streamed)
    cropped_because: str | None = None

    @property
    def worst_param(self) -> tuple[str, float]:
        name = max(self.param_errors, key=self.param_errors.__getitem__)
        return name, self.param_errors[name]

    @property
    def passed(self) -> bool:
        errors = [self.output_error, self.input_grad_error, *self.param_errors.values()]
        return all(error <= self.tolerance for error in errors)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in vars(self).items()}, "passed": self.passed}


def verify(config: VerifyConfig, memory: int | None = None) -> Verification:
    """Compare one conventional and one streamed training step (module docstring).

    Args:
        config: the model (as for `sstream train`), the input (random pixels, or `image`
            read as `read_spec` says, its centre cropped or padded to `image_size`), the tile
            and the dtype: "float64" (exactness: tolerance 1e-9) or "float32" (1e-4).
        memory: bytes the conventional step may use (default: MEMORY_SHARE of what the device
            has available).

    Raises:
        ValueError: an unknown model, split point or dtype, a bad size, an unreadable image.
    """
    config.validate()
    torch_dtype = getattr(torch, config.dtype)
    target = resolve_device(config.device)
    classifier = _build(config.model, config.stream_layers, config.weights, torch_dtype,
                        target, config.pooling)
    available = memory if memory is not None else int(MEMORY_SHARE * _available(target))
    verified, because = _fitting_size(classifier, config.image_size, config.tile_size,
                                      available)
    pixels = _input(config.image, verified, config.seed, torch_dtype,
                    config.read_spec()).to(target)
    scnn = StreamingCNN(classifier.stream, config.tile_size)
    label = torch.tensor([1], device=target)
    plain = _step(classifier, lambda x: classifier(x), pixels, label, target)
    streamed = _step(classifier, lambda x: streamed_logits(classifier, scnn, x), pixels, label,
                     target)
    return Verification(
        model=config.model, stream_layers=config.stream_layers, size=config.image_size,
        verified_size=verified, tile_size=scnn.tile_size, dtype=config.dtype,
        device=str(target), path=training_path(classifier), tolerance=TOLERANCES[config.dtype],
        output_error=_relative(streamed.logits, plain.logits),
        input_grad_error=_relative(streamed.input_grad, plain.input_grad),
        param_errors={name: _relative(streamed.grads[name], grad)
                      for name, grad in plain.grads.items()},
        seconds=(plain.seconds, streamed.seconds), peak_bytes=(plain.peak, streamed.peak),
        cropped_because=because)

def _build(name: str, stream_layers: str | None, weights: str | None, dtype: torch.dtype,
           device: torch.device, pooling: str = "max") -> Classifier:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, 2, stream_layers, pooling), weights=weights)
    freeze_batchnorm(model, train_affine=True)
    return model.to(device=device, dtype=dtype).train()


def _available(device: torch.device) -> int:
    """Bytes free for a step: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # no way to ask: assume a modest machine


def _fitting_size(model: Classifier, size: tuple[int, int], tile: int, available: int
                  ) -> tuple[tuple[int, int], str | None]:
    """`size`, or the largest centred crop of it whose conventional step is estimated to fit
    `available` bytes (memory grows with the area), with the reason for cropping. The
    estimate is float32's, scaled by the item size (float64 doubles every tensor)."""
    itemsize = next(model.parameters()).element_size()
    peak = estimate_training_memory(model.stream, model.head, size, [], optimizer="sgd"
                                    ).conventional.peak_bytes * itemsize // 4
    if peak <= available:
        return size, None
    scale = math.sqrt(available / peak)
    crop = tuple(max(tile, int(side * scale)) for side in size)
    return crop, (f"conventional training of {size[1]} x {size[0]} needs about "  # type: ignore
                  f"{peak / 2**30:.1f} GiB (estimated), more than the "
                  f"{available / 2**30:.1f} GiB available: verified on a centred "
                  f"{crop[1]} x {crop[0]} crop")


def _input(image: str | None, size: tuple[int, int], seed: int, dtype: torch.dtype,
           read: ReadSpec) -> torch.Tensor:
    """(1, 3, H, W) pixels / 255: uniform noise by `seed`, or the centre of `image` as
    `read` reads it (padded with white where it is smaller)."""
    if image is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand((1, 3, *size), generator=generator, dtype=dtype)
    with replace(read, image_size=size, tissue=None).open(image, read_ahead=0) as opened:
        opened.source.dtype = dtype
        return opened.source.to_tensor()


@dataclass
class _Step:
    logits: torch.Tensor
    input_grad: torch.Tensor
    grads: dict[str, torch.Tensor]
    seconds: float
    peak: int


def _step(model: Classifier, forward: Callable[[torch.Tensor], torch.Tensor],
          pixels: torch.Tensor, label: torch.Tensor, device: torch.device) -> _Step:
    """One training step: forward, cross-entropy, backward; gradients taken and reset."""
    model.zero_grad(set_to_none=True)
    leaf = pixels.detach().clone().requires_grad_(True)
    external = [leaf, *model.parameters(), *model.buffers()]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    began = time.perf_counter()
    with LiveBytes(external) as live:
        logits = forward(leaf)
        F.cross_entropy(logits, label).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = live.peak
    seconds = time.perf_counter() - began
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    assert leaf.grad is not None
    return _Step(logits.detach(), leaf.grad.detach(), grads, seconds, peak)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the difference where expected is 0)."""
    scale = expected.abs().max().item()
    difference = (actual.double() - expected.double()).abs().max().item()
    return difference / scale if scale > 0 else difference
