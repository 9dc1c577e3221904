"""Speed of streaming against plain PyTorch on the whole image: training step and predict.

Rows: one per (model, image size, tile size). A training step is forward + head + loss +
backward (no optimizer step: it costs the same in both). Plain and streaming steps alternate
(warm-up first, then `reps` pairs) and the ratio is taken pair by pair, then the median: on a
shared machine absolute seconds drift, ratios measured side by side hold. The StreamingCNN is
made and planned once per row, as `sstream train` and `predict` do (plans are cached per
image shape); `planning s` is that one-time cost. Columns add forward-only (predict) ratios
against plain `torch.no_grad()`, and the peak memory of one step of each (CPU: peak bytes
of live tensors, CUDA: max_memory_allocated). Notes give the per-tile overhead of a 1x1-conv
stream (many small tiles against the same work in one tile).

Every measurement runs in a fresh process (`fresh_process.measure`): one row's result must
not depend on the rows before it, and neither memory peak may inflate the other.

Standalone: `python benchmarks/bench_speed.py [--quick]` (prints JSON).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fresh_process import device as fresh_device  # noqa: E402
from benchmarks.fresh_process import measure  # noqa: E402
from sstream import StreamingCNN  # noqa: E402
from sstream.engine.memory import LiveBytes  # noqa: E402
from sstream.models import ModelConfig, build_model, freeze_batchnorm  # noqa: E402

FULL = [("resnet18", 2048, (512, 1024)), ("resnet18", 1024, (256, 512)),
        ("tiny", 2048, (256, 512, 1024)), ("tiny", 1024, (256, 512))]
QUICK = [("resnet18", 1024, (512,)), ("tiny", 1024, (256,))]
MODULE = "benchmarks.bench_speed"


def build(name: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(stream, head) of a model zoo entry, BatchNorm frozen (streaming requires eval BN)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name))
    freeze_batchnorm(model, train_affine=True)
    model.to(device)
    return model.stream, model.head


def training_step(trunk: nn.Module, head: nn.Module, image: torch.Tensor) -> None:
    """Forward + head + loss + backward; `trunk` is the stream itself (plain PyTorch on the
    whole image) or a StreamingCNN made once, as `sstream train` makes it."""
    loss = head(trunk(image)).logsumexp(dim=1).sum()
    loss.backward()
    trunk.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)


def predict(trunk: nn.Module, image: torch.Tensor) -> None:
    with torch.no_grad():
        trunk(image)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def paired(plain: Callable[[], None], streamed: Callable[[], None], reps: int,
           device: torch.device) -> tuple[float, float, float]:
    """Median seconds of each and median of the pairwise ratios, after one warm-up each."""
    plain()
    streamed()
    times: list[tuple[float, float]] = []
    for rep in range(reps):  # alternate which goes first: drift hits both alike
        if rep % 2:
            s = _timed(streamed, device)
            p = _timed(plain, device)
        else:
            p = _timed(plain, device)
            s = _timed(streamed, device)
        times.append((p, s))
    return (statistics.median(p for p, _ in times), statistics.median(s for _, s in times),
            statistics.median(s / p for p, s in times))


def step_peak_mb(name: str, size: int, tile: int | None, device: torch.device) -> float:
    """Peak MB that one training step allocates, plain (`tile` None) or streamed. Run it in a
    fresh process, so that neither peak inflates the other."""
    stream, head = build(name, device)
    image = torch.rand(1, 3, size, size, device=device)
    trunk: nn.Module = stream
    if tile is not None:  # planned before the step, as in training
        trunk = StreamingCNN(stream, tile)
        trunk.engine_for(image.shape)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        training_step(trunk, head, image)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with LiveBytes((image, *stream.parameters(), *head.parameters())) as live:
        training_step(trunk, head, image)
    return live.peak / 2**20


def hand_written_tiles(stream: nn.Module, image: torch.Tensor, tile: int) -> None:
    """The least a tiled training step of a stream without overlap (1x1 convolutions) can do
    in eager PyTorch: a no-grad pass per tile into the feature map, the loss gradient, then
    per tile a re-run with autograd and its backward. Its many-tile / one-tile ratio is
    PyTorch's own per-tile cost, the floor under sstream's."""
    height, width = image.shape[-2:]
    boxes = [(y, x) for y in range(0, height, tile) for x in range(0, width, tile)]
    with torch.no_grad():
        fmap = torch.cat([torch.cat([stream(image[..., y:y + tile, x:x + tile])
                                     for x in range(0, width, tile)], dim=-1)
                          for y in range(0, height, tile)], dim=-2)
    leaf = fmap.requires_grad_()
    leaf.square().sum().backward()
    assert leaf.grad is not None
    for y, x in boxes:
        stream(image[..., y:y + tile, x:x + tile]).backward(
            leaf.grad[..., y:y + tile, x:x + tile])
    stream.zero_grad(set_to_none=True)


def per_tile_overhead(tile: int, reps: int, device: torch.device) -> tuple[float, float, int]:
    """Training step of a 1x1-conv stream on a 1024 px image: many tiles of `tile` px against
    one tile, same work; (sstream's ratio, the hand-written tile loop's ratio, tiles)."""
    stream = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU()).to(device)
    image = torch.rand(1, 3, 1024, 1024, device=device)

    def step(tile: int) -> Callable[[], None]:
        scnn = StreamingCNN(stream, tile)

        def run() -> None:
            scnn(image).square().sum().backward()
            stream.zero_grad(set_to_none=True)
        return run

    _, _, ratio = paired(step(1024), step(tile), reps, device)
    _, _, floor = paired(lambda: hand_written_tiles(stream, image, 1024),
                         lambda: hand_written_tiles(stream, image, tile), reps, device)
    return ratio, floor, len(StreamingCNN(stream, tile).plan(image.shape))


def training_steps(name: str, size: int, tile: int, reps: int, device: torch.device,
                   ) -> tuple[float, float, float, float]:
    """(plain s, streamed s, their ratio, planning s) of a training step, the StreamingCNN
    made and planned once (the halo programs of training and predict) as `sstream train`
    does. Run it in a fresh process: after the big rows of a benchmark, a process's heap
    made plain steps faster and streamed ones slower (tiny at 1024 px, tile 256: 2.23x
    there, 1.6-1.7x alone, for the same code)."""
    stream, head = build(name, device)
    image = torch.rand(1, 3, size, size, device=device)
    scnn = StreamingCNN(stream, tile)
    began = time.perf_counter()
    scnn.plan(image.shape)
    scnn.engine_for(image.shape)  # the halo programs too: planned once per image shape
    scnn.halo_program(image.shape, training=False)
    planning = time.perf_counter() - began
    return (*paired(lambda: training_step(stream, head, image),
                    lambda: training_step(scnn, head, image), reps, device), planning)


def predict_ratio(name: str, size: int, tile: int, reps: int, device: torch.device) -> float:
    """Median streamed / plain ratio of a forward pass without autograd. Run it in a process
    that only predicts, as `sstream predict` does: after a plain training step, glibc serves
    the plain forward's activations from the heap that step left (ResNet-18 at 1024 px: 16k
    page faults per forward instead of 90-113k, 1.26 s instead of 1.36 s), which a process
    that only predicts never has."""
    stream, _ = build(name, device)
    image = torch.rand(1, 3, size, size, device=device)
    scnn = StreamingCNN(stream, tile)
    scnn.halo_program(image.shape, training=False)
    return paired(lambda: predict(stream, image), lambda: predict(scnn, image), reps, device)[2]


def _row(name: str, size: int, tile: int, reps: int) -> list:
    """One table row, each measurement in a fresh process."""
    plain_s, stream_s, ratio, planning = measure(MODULE, "training_steps", name, size, tile,
                                                 reps)
    predicted = measure(MODULE, "predict_ratio", name, size, tile, reps)[0]
    plain_mb, stream_mb = (measure(MODULE, "step_peak_mb", name, size, t)[0]
                           for t in (None, tile))
    return [name, size, tile, round(plain_s, 3), round(stream_s, 3), round(ratio, 2),
            round(plain_mb), round(stream_mb), round(plain_mb / max(stream_mb, 1e-9), 1),
            round(predicted, 2), round(planning, 2)]


def run(quick: bool = False) -> dict:
    device = fresh_device()
    reps = 3 if quick else 5
    rows, notes = [], []
    for name, size, tiles in QUICK if quick else FULL:
        rows += [_row(name, size, tile, reps) for tile in tiles]
    overheads = []
    for tile in (64,) if quick else (32, 64, 128):  # quick: the size of the target
        overhead, floor, tiles = measure(MODULE, "per_tile_overhead", tile, reps)
        overheads.append(f"{tiles:.0f} tiles of {tile} px: {overhead:.2f}x (hand-written tile "
                         f"loop: {floor:.2f}x)")
    notes.append("per-tile overhead (training step of a 1x1-conv stream on a 1024 px image, "
                 "many tiles vs one tile of the same work; the hand-written loop is PyTorch's "
                 "own per-tile cost): " + ", ".join(overheads))
    notes.append(f"{reps} paired repetitions after a warm-up; ratios are medians of pairwise "
                 f"ratios; torch threads: {torch.get_num_threads()}; device: {device}")
    return {"title": "Streaming vs plain PyTorch (training step; predict = no-grad forward)",
            "columns": ["model", "image", "tile", "plain s", "stream s", "step ratio",
                        "plain MB", "stream MB", "memory saved x", "predict ratio",
                        "planning s"],
            "rows": rows, "notes": notes}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
