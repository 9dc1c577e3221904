"""Device, mixed precision and memory bookkeeping shared by the jobs (train, predict, ...)."""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def amp_dtype(device: torch.device, requested: str | None) -> torch.dtype:
    """The autocast dtype: as requested, else fp16 on CUDA and bf16 on CPU."""
    if requested is not None:
        if requested not in AMP_DTYPES:
            raise ValueError(f"unknown AMP dtype {requested!r}; use bf16 or fp16")
        return AMP_DTYPES[requested]
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype
             ) -> contextlib.AbstractContextManager:
    """torch.autocast for the device, or a no-op when mixed precision is off."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
