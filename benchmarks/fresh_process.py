"""Run one benchmark measurement in a fresh Python process and read back its numbers.

What a process ran before changes what it measures: the heap a long benchmark leaves behind
made plain steps faster and streamed ones slower (tiny at 1024 px, tile 256: 2.23x after the
big rows, 1.6-1.7x alone), and a peak resident set can only be read once per process. So
every row's measurement runs alone: `measure(module, function, *args)` starts a process that
calls `module.function(*args, device)` and prints the numbers it returns on its last line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def device() -> torch.device:
    """The device benchmarks run on: CUDA when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure(module: str, function: str, *args: object,
            env: dict[str, str] | None = None) -> list[float]:
    """The numbers `module.function(*args, device)` returns, computed in a fresh process
    (with `env` added to its environment)."""
    code = (f"import {module} as m; from benchmarks.fresh_process import report; "
            f"report(m.{function}, {args!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False, env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"{module}.{function}{args} failed:\n{out.stderr[-3000:]}")
    return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]


def report(function: Callable[..., object], args: tuple) -> None:
    """(In the fresh process.) Print what `function(*args, device)` returns, on one line."""
    result = function(*args, device())
    print(*(result if isinstance(result, tuple) else (result,)))
