"""Whole-slide training: memory flat in the slide's area, speed against plain PyTorch.

A training step on the whole-slide path (`streamed_logits`: a pooling head, so
`StreamingCNN.global_pool` pools tile by tile and its backward re-runs only the blocks the
pooled gradient reaches) is measured in a fresh process per row (see bench_speed: what a
process ran before changes its numbers). The image is noise computed per region from its
coordinates (`NoiseImage`): never whole in memory, as a slide read lazily is not.

Memory rows (ResNet-18, max pooling): the step's peak as live tensor bytes (`LiveBytes`:
what the allocator must hold, independent of it) and as the process's peak resident set
above its baseline (VmHWM, default glibc allocator: what a user sees), beside the memory
estimate of the whole-slide path, the feature-map path and plain PyTorch (estimated: their
steps do not fit this machine at the larger sizes, or take hours).

Speed rows: the step against plain PyTorch's training step where that fits, else against a
plain no-grad forward; max pooling and average pooling; how many blocks the backward re-ran
(beside the forward's tiles: blocks may be smaller than a tile).
Standalone: `python -m benchmarks.bench_whole_slide [--quick]`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fresh_process import measure  # noqa: E402
from sstream import StreamingCNN  # noqa: E402
from sstream.engine.memory import LiveBytes, estimate_training_memory  # noqa: E402
from sstream.models import (  # noqa: E402
    ModelConfig,
    build_model,
    freeze_batchnorm,
    streamed_logits,
)

MEMORY_SIZES = {"full": (2048, 4096, 8192, 20000), "quick": (1024, 2048)}
MEMORY_TILE = 512
WARM_UP = 256  # px: the image every process warms its kernels on
# (model, size, tile, compared with): plain's training step where it fits this machine, else
# its no-grad forward; above PLAIN_LIMIT px not even that fits (ResNet-18's first activation
# at 20,000 px is 25 GB): the forward at PLAIN_LIMIT px, scaled by the area
SPEED = {"full": [("tiny", 4096, 256, "step"), ("resnet18", 8192, 512, "forward"),
                  ("resnet18", 20000, 512, "forward")],
         "quick": [("tiny", 2048, 256, "step"), ("resnet18", 2048, 512, "forward")]}
PLAIN_LIMIT = 8192
MODULE = "benchmarks.bench_whole_slide"


class NoiseImage:
    """A (1, 3, H, W) image of uniform noise in [0, 1), each pixel a hash of (channel, y, x,
    seed): every read of a region gives the same pixels, and nothing is kept."""

    def __init__(self, height: int, width: int, seed: int = 0) -> None:
        self.height, self.width, self.seed = height, width, seed

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.height, self.width)

    def read(self, box: tuple[int, int, int, int]) -> torch.Tensor:
        y0, y1, x0, x1 = box
        y = torch.arange(y0, y1, dtype=torch.int64)[None, :, None]
        x = torch.arange(x0, x1, dtype=torch.int64)[None, None, :]
        c = torch.arange(3, dtype=torch.int64)[:, None, None]
        h = y * 73856093 + x * 19349663 + c * 83492791 + self.seed * 2654435761
        for shift, factor in ((16, 0x45D9F3B), (16, 0x45D9F3B), (16, 1)):
            h = ((h >> shift) ^ h) * factor & 0xFFFFFFFF
        return ((h & 0xFFFFFF).float() / 2**24).unsqueeze(0)


def _model(name: str, pooling: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, pooling=pooling))
    freeze_batchnorm(model, train_affine=True)
    return model.train()


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _step(model: torch.nn.Module, scnn: StreamingCNN, image: NoiseImage) -> None:
    F.cross_entropy(streamed_logits(model, scnn, image), torch.tensor([1])).backward()
    model.zero_grad(set_to_none=True)


def whole_slide(name: str, size: int, tile: int, pooling: str, reps: int,
                device: torch.device) -> tuple[float, float, float, int, int]:
    """(median step s, live peak MiB, RSS peak MiB above the baseline, blocks re-run, tiles)
    of `reps` whole-slide steps. The baseline is the resident set with the model built;
    kernels are then warmed on the same small image at every size (their first-call
    allocations count, as a user's first step has them), and the first full-size step's
    memory is measured (LiveBytes' bookkeeping costs about a millisecond per crop)."""
    model = _model(name, pooling).to(device)
    scnn = StreamingCNN(model.stream, tile)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # peak RSS := current RSS
    baseline = _rss("VmRSS")
    _step(model, scnn, NoiseImage(WARM_UP, WARM_UP, seed=1))
    image = NoiseImage(size, size)
    scnn.halo_program(image.shape, training=False)  # planned before the step, as in training
    reran = []
    scnn.on_tile = lambda phase, done, total: reran.append(total) if phase == "backward" \
        and done == 1 else None
    began = time.perf_counter()
    with LiveBytes([*model.parameters(), *model.buffers()]) as live:
        _step(model, scnn, image)
    times = [time.perf_counter() - began]
    rss = _rss("VmHWM") - baseline
    for _ in range(reps - 1):
        began = time.perf_counter()
        _step(model, scnn, image)
        times.append(time.perf_counter() - began)
    return (statistics.median(times), live.peak / 2**20, rss / 2**20, reran[-1],
            len(scnn.plan(image.shape)))


def plain(name: str, size: int, what: str, reps: int, device: torch.device) -> float:
    """Median seconds of plain PyTorch on the whole image: a training step or a no-grad
    forward (the image tensor made beforehand)."""
    model = _model(name, "max").to(device)
    image = NoiseImage(size, size).read((0, size, 0, size)).to(device)

    def run() -> None:
        if what == "forward":
            with torch.no_grad():
                model(image)
            return
        F.cross_entropy(model(image), torch.tensor([1])).backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        model(image[..., :WARM_UP, :WARM_UP])  # first-call allocations
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _estimates(name: str, size: int, tile: int) -> tuple[float, float, float]:
    """Estimated peaks (MiB): the whole-slide path, the feature-map path, plain PyTorch."""
    model = _model(name, "max")
    rows = {}
    for whole in (True, False):
        estimate = estimate_training_memory(model.stream, model.head, (size, size), [tile],
                                            whole_slide=whole)
        rows[whole] = estimate.rows
    return (rows[True][1].peak_bytes / 2**20, rows[False][1].peak_bytes / 2**20,
            rows[True][0].peak_bytes / 2**20)


def run(quick: bool = False) -> dict:
    kind = "quick" if quick else "full"
    reps = 1 if quick else 2
    rows = []
    first_live = first_rss = None
    measured = {}
    for size in MEMORY_SIZES[kind]:
        measured[size] = seconds, live, rss, reran, tiles = measure(
            MODULE, "whole_slide", "resnet18", size, MEMORY_TILE, "max", 1)
        estimated, feature_map, conventional = _estimates("resnet18", size, MEMORY_TILE)
        first_live, first_rss = first_live or live, first_rss or rss
        rows.append([f"resnet18 {size} px, tile {MEMORY_TILE}, max", "memory",
                     f"{live:.0f} ({live / first_live:.2f}x)",
                     f"{rss:.0f} ({rss / first_rss:.2f}x)", f"{estimated:.0f}",
                     f"{feature_map:.0f}", f"{conventional:.0f}",
                     f"{reran:.0f} ({tiles:.0f} tiles)", f"{seconds:.1f}", "-"])
    baselines: dict[tuple[str, int, str], float] = {}
    for name, size, tile, against in SPEED[kind]:
        plain_size = min(size, PLAIN_LIMIT)
        key = (name, plain_size, against)
        if key not in baselines:
            baselines[key] = measure(MODULE, "plain", name, plain_size, against,
                                     reps if name == "tiny" else 1)[0]
        baseline = baselines[key] * (size / plain_size) ** 2
        how = f"plain {against}" + ("" if size == plain_size else
                                    f", {plain_size} px's x area")
        for pooling in ("max", "avg") if size <= PLAIN_LIMIT else ("max",):
            steps = reps if name == "tiny" else 1  # ResNet-18 steps take minutes
            if (name, tile, pooling) == ("resnet18", MEMORY_TILE, "max") and size in measured:
                seconds, live, rss, reran, tiles = measured[size]  # a memory row's step
            else:
                seconds, live, rss, reran, tiles = measure(
                    MODULE, "whole_slide", name, size, tile, pooling, steps)
            rows.append([f"{name} {size} px, tile {tile}, {pooling}", "speed", f"{live:.0f}",
                         f"{rss:.0f}", "-", "-", "-", f"{reran:.0f} ({tiles:.0f} tiles)",
                         f"{seconds:.1f}", f"{seconds / baseline:.2f}x {how} "
                                           f"({baseline:.1f} s)"])
    return {"title": "Whole-slide training (pooling head: no feature map, backward only where "
                     "the gradient goes)",
            "columns": ["model, image", "row", "live MiB", "RSS MiB", "estimate MiB",
                        "feature-map path MiB (est.)", "plain MiB (est.)", "blocks re-run",
                        "step s", "vs plain"],
            "rows": rows,
            "notes": [
                "live MiB: peak bytes of the tensors the step makes (LiveBytes); RSS MiB: "
                "the process's peak resident set (default allocator) above its resident set "
                f"with the model built, kernels warmed on a {WARM_UP} px image first; "
                "(..x): against the smallest image. Both leave out the model's parameters, "
                "which exist before the step.",
                "estimate MiB and (est.): sstream's memory estimate of a whole training "
                "step with the model's parameters and AdamW state (ResNet-18: 43 MiB each), "
                "on the whole-slide path, the feature-map path and plain PyTorch.",
                f"blocks re-run: crops the backward re-ran for the pooled gradient (blocks "
                f"of one to a tile's outputs, sized per image), beside the forward's tiles; "
                f"step s: the first step at full size (tiny: median of {reps}) after a "
                f"warm-up on a small image; above {PLAIN_LIMIT} px plain PyTorch's forward "
                f"does not fit this machine: its time at {PLAIN_LIMIT} px is scaled by the "
                f"area; torch threads: {torch.get_num_threads()}"]}


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
