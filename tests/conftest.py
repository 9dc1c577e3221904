"""Shared test helpers: comparison against plain autograd on the whole image."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from hypothesis import settings

# `SSTREAM_HYPOTHESIS=hunt make test` searches far longer for engine bugs.
settings.register_profile("default", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("hunt", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("SSTREAM_HYPOTHESIS", "default"))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zeros)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


@contextlib.contextmanager
def float64_training() -> Iterator[None]:
    """Train in float64: models built inside are float64 (the default dtype), and training
    reads pixels in the model's dtype. One thread, like spawned ranks. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(threads)


def assert_autocast_matches_plain(results: list[tuple[torch.Tensor, list[torch.Tensor]]]
                                  ) -> None:
    """[(plain output, its parameter gradients), (streamed ...)] under bf16 autocast: both
    bf16, equal within bf16's ~3 significant digits."""
    (plain, plain_grads), (streamed, streamed_grads) = results
    assert plain.dtype == streamed.dtype == torch.bfloat16
    assert torch.allclose(streamed.float(), plain.float(), rtol=2e-2, atol=2e-2)
    for grad, want in zip(streamed_grads, plain_grads, strict=True):
        assert torch.allclose(grad, want, rtol=5e-2, atol=5e-2)
