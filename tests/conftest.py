"""Shared test helpers: comparison against plain autograd on the whole image."""

from __future__ import annotations

import os

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
