"""CPU memory as a user sees it: peak RSS against live tensor bytes, and the allocator.

Two training steps of ResNet-18 (plain, the feature-map path, the whole-slide path), each
configuration in a fresh process, with glibc's default allocator and with
`sstream --compact-memory` (`runtime.compact_cpu_memory`): the peak resident set above the
process's baseline against the peak of live tensor bytes (LiveBytes, measured in a process of
its own: its bookkeeping costs time), and the second step's time.
Run standalone: `python -m benchmarks.bench_allocator [--quick]`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.fresh_process import measure
from sstream import StreamingCNN
from sstream.engine.memory import LiveBytes
from sstream.models import ModelConfig, build_model, freeze_batchnorm, streamed_logits
from sstream.runtime import compact_cpu_memory

MODULE = "benchmarks.bench_allocator"
# (path, tile): plain PyTorch, then streamed on each path
CASES = [("plain", None), ("feature map", 512), ("feature map", 1024), ("whole slide", 512)]
SIZE = {"full": 2048, "quick": 1024}


def _resident(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: now, VmHWM: the peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def allocator_steps(path: str, size: int, tile: int | None, allocator: str, figure: str,
                    device: torch.device) -> tuple[float, float]:
    """(In a fresh process.) Two training steps of ResNet-18 at `size` px on `path`, with
    the `allocator` setting ("default" or "compact"): figure "rss" gives (the second step's
    seconds, peak RSS MiB above the baseline over both), "live" gives (0, the second step's
    peak live tensor MiB). The baseline: model, image and warmed kernels in memory."""
    if allocator == "compact":
        compact_cpu_memory()
    torch.manual_seed(0)
    model = build_model(ModelConfig("resnet18"))
    freeze_batchnorm(model, train_affine=True)
    model.train()
    image = torch.rand(1, 3, size, size)
    scnn = StreamingCNN(model.stream, tile) if tile else None

    def step() -> None:
        if scnn is None:
            logits = model(image)
        else:
            logits = streamed_logits(model, scnn, image, whole_slide=path == "whole slide")
        F.cross_entropy(logits, torch.tensor([1])).backward()
        model.zero_grad(set_to_none=True)

    F.cross_entropy(model(image[..., :256, :256]), torch.tensor([1])).backward()
    model.zero_grad(set_to_none=True)  # kernels' first-call allocations
    if figure == "live":  # the second step: LiveBytes would count the plan's meta tensors
        step()
        with LiveBytes([image, *model.parameters(), *model.buffers()]) as live:
            step()
        return 0.0, live.peak / 2**20
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # peak RSS := current RSS
    baseline = _resident("VmRSS")
    step()
    began = time.perf_counter()
    step()
    return time.perf_counter() - began, (_resident("VmHWM") - baseline) / 2**20


def run(quick: bool = False) -> dict:
    """Rows: configuration, live MiB, then RSS MiB (x live) and step s per allocator."""
    size = SIZE["quick" if quick else "full"]
    cases = CASES[::3] if quick else CASES
    rows = []
    for path, tile in cases:
        _, live = measure(MODULE, "allocator_steps", path, size, tile, "default", "live")
        row = [f"resnet18 {size} px, " + (path if tile is None else f"tile {tile}, {path}"),
               f"{live:.0f}"]
        for allocator in ("default", "compact"):
            seconds, rss = measure(MODULE, "allocator_steps", path, size, tile, allocator,
                                   "rss")
            row += [f"{rss:.0f} ({rss / live:.2f}x)", f"{seconds:.1f}"]
        rows.append(row)
    return {"title": "CPU memory as users see it: peak RSS against live tensors, glibc's "
                     "default allocator and --compact-memory",
            "columns": ["model, image, path", "live MiB", "RSS MiB (default)", "step s",
                        "RSS MiB (compact)", "step s (compact)"],
            "rows": rows,
            "notes": ["live MiB: peak bytes of the tensors a training step makes (what any "
                      "allocator must hold); RSS MiB: the process's peak resident set over "
                      "two steps above its resident set with model, image and warmed kernels; "
                      "(..x): RSS / live; step s: the second step; compact: "
                      "runtime.compact_cpu_memory() (mmap threshold 1 MiB) at start-up; "
                      f"torch threads: {torch.get_num_threads()}"]}



if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
