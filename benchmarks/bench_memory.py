"""Predicted vs measured peak training memory (ResNet-18, CPU), and the paper-scale figure.

Measured: peak RSS of one AdamW training step in a subprocess (see tests/engine/test_memory.py
for the method; glibc told to unmap everything above 64 KiB at once, so that RSS follows the
tensors; bench_allocator shows RSS with the default allocator); predicted:
`sstream.engine.memory.estimate_training_memory` on the meta device. Then ResNet-34 at
8192 x 8192 (64 megapixels), conventional vs streaming, predicted only.
Run standalone: `python -m benchmarks.bench_memory [--quick]`.
"""

from __future__ import annotations

import time

from sstream.engine.memory import estimate_training_memory
from sstream.estimate import format_bytes
from sstream.models import ModelConfig, build_model
from tests.engine.test_memory import CASES, measure_peaks, predict_peak


def run(quick: bool = False) -> dict:
    """Rows: configuration, predicted, measured, error; then the ResNet-34 8192^2 rows."""
    cases = CASES[:1] if quick else CASES
    rows = []
    for (side, tile, split, pooling), measured in zip(cases, measure_peaks(cases)):
        predicted = predict_peak(side, tile, split, pooling)
        path = f"whole-slide ({pooling} pooling)" if pooling else "feature map, crops"
        label = "conventional" if not tile else f"streaming tile {tile}, {path}"
        rows.append([f"resnet18 {side}x{side}", f"{label}, stream {split or 'whole trunk'}",
                     format_bytes(predicted), format_bytes(measured),
                     f"{(predicted - measured) / measured:+.1%}"])
    model = build_model(ModelConfig("resnet34"))
    start = time.monotonic()
    estimate = estimate_training_memory(model.stream, model.head, (8192, 8192),
                                        [512, 1024, 2048])
    seconds = time.monotonic() - start
    for row in estimate.rows:
        label = ("conventional" if row.mode == "conventional"
                 else f"streaming tile {row.tile_size[0]}, {row.path} ({row.saving:.0%} "
                      f"less, {row.compute_overhead:.1f}x compute)")
        rows.append(["resnet34 8192x8192", label, format_bytes(row.peak_bytes), "-",
                     f"estimated in {seconds:.1f} s"])
    return {"title": "Peak training memory: predicted (meta device) vs measured (CPU RSS)",
            "columns": ["model, image", "mode", "predicted", "measured", "error / note"],
            "rows": rows}


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
