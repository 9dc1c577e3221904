"""Attention pooling at whole-slide scale (issue 31): a training step's memory against the
slide's area.

One training step of ResNet-18 with CLAM-SB's gated attention head (`--pooling attention`)
on the whole-slide path (`StreamingCNN.attention_pool`: an online softmax over the tiles, the
backward re-running every tile) per image size, each in a fresh process: the step's peak
above what exists before it (the model, its gradients' first allocation excluded: kernels
are warmed on a small image first). On CUDA the allocator's peak (`max_memory_allocated`),
on the CPU the peak of live tensor bytes (`LiveBytes`). The image is noise computed per
region (`NoiseImage`): never whole in memory. Done when the largest image's peak is at most
FLAT_LIMIT times the smallest's.
Standalone: `python -m benchmarks.bench_attention [--quick]`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_whole_slide import WARM_UP, NoiseImage  # noqa: E402
from benchmarks.fresh_process import measure  # noqa: E402
from sstream import StreamingCNN  # noqa: E402
from sstream.engine.memory import LiveBytes  # noqa: E402
from sstream.models import ModelConfig, build_model, freeze_batchnorm, streamed_logits  # noqa: E402

SIZES = {"full": ("resnet18", 512, (2048, 8192)), "quick": ("tiny", 128, (512, 1024))}
FLAT_LIMIT = 1.3
MODULE = "benchmarks.bench_attention"


def step_memory(name: str, size: int, tile: int, device: torch.device
                ) -> tuple[float, float, int]:
    """(step seconds, peak MiB above the step's start, tiles) of one attention step."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, pooling="attention"))
    freeze_batchnorm(model, train_affine=True)
    model = model.train().to(device)
    scnn = StreamingCNN(model.stream, tile)
    label = torch.tensor([1], device=device)

    def step(image: NoiseImage) -> None:
        F.cross_entropy(streamed_logits(model, scnn, image), label).backward()

    step(NoiseImage(WARM_UP, WARM_UP, seed=1))  # kernels, and the gradients' storage
    image = NoiseImage(size, size)
    scnn.halo_program(image.shape, training=False)  # planned before the step, as in training
    began = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(image)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        with LiveBytes([*model.parameters(), *model.buffers(),
                        *(p.grad for p in model.parameters() if p.grad is not None)]) as live:
            step(image)
        peak = live.peak
    return time.perf_counter() - began, peak / 2**20, len(scnn.plan(image.shape))


def run(quick: bool = False) -> dict:
    name, tile, sizes = SIZES["quick" if quick else "full"]
    rows, first = [], None
    for size in sizes:
        seconds, peak, tiles = measure(MODULE, "step_memory", name, size, tile)
        first = first or peak
        rows.append([f"{name} {size} px, tile {tile}, attention", f"{peak:.0f}",
                     f"{peak / first:.2f}x", f"{tiles:.0f}", f"{seconds:.1f}"])
    return {"title": "Attention pooling on the whole-slide path: a training step's memory",
            "columns": ["model, image", "peak MiB", "vs smallest", "tiles", "step s"],
            "rows": rows,
            "notes": [f"peak MiB: the step's peak above its start (CUDA: the allocator's; "
                      f"CPU: live tensor bytes), kernels warmed on a {WARM_UP} px image "
                      f"first; flat means at most {FLAT_LIMIT}x the smallest image's."]}


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
