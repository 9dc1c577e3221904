"""Device, mixed precision and memory bookkeeping shared by the jobs (train, predict, ...),
and the one parser of memory sizes (`parse_bytes`: --memory-budget)."""

from __future__ import annotations

import contextlib
import math
import re
import resource
import sys

import torch

from sstream.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'12GiB', '12 GB', '500MiB', '12e9' -> bytes. GB = 10**9, GiB = 2**30; ValueError else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _BYTE_UNITS:
        raise InputError(f"cannot parse memory budget {text!r}: write e.g. 12GiB (12 * 2**30 "
                         "bytes), 12GB (12e9 bytes), 500MiB or a number of bytes")
    value = float(match.group(1)) * _BYTE_UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"memory budget must be positive, got {text!r}")
    return int(value)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def amp_dtype(device: torch.device, requested: str | None) -> torch.dtype:
    """The autocast dtype: as requested, else fp16 on CUDA and bf16 on CPU."""
    if requested is not None:
        if requested not in AMP_DTYPES:
            raise InputError(f"unknown AMP dtype {requested!r}; use bf16 or fp16")
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
COMPACT_MMAP_THRESHOLD = 2**20


def compact_cpu_memory(threshold: int = COMPACT_MMAP_THRESHOLD) -> bool:
    """Make the process's resident memory follow its live tensors on the CPU, at a cost in
    speed; whether it could (glibc only).

    glibc serves allocations below a threshold from heaps it keeps after they are freed, and
    raises that threshold to the size of every large block freed (up to 32 MiB): after the
    first tiles, a streamed step's per-tile tensors all come from the heap, whose free space
    fragments, and the peak resident set of a ResNet-18 step at tile 512 is 2.6-4x its live
    tensor bytes. A fixed threshold of 1 MiB maps every larger tensor on its own and unmaps it
    when freed (and stops the raising), and the heap is trimmed as soon as 1 MiB at its top is
    free. The price is a page fault for each page of each new tensor: steps run ~1.7x slower
    (benchmarks/bench_memory.py measures both; docs/results.md has the table).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold))
