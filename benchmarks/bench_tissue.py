"""Tissue masks: predict and a training step on a slide that is 20% tissue, auto vs none.

The slide is synthetic (`write_synthetic_slide(..., tissue_fraction=0.2)`, 0.5 µm per pixel,
tissue in a few large islands, glass around them), written once into a temporary folder.
Each measurement runs in a fresh process (see bench_speed) and reads the slide lazily, as
`sstream predict` and `sstream train` do; the share of the slide's pixels read is counted at
the image source (the tiles the engine skips are neither read nor computed). Time includes
finding the tissue on the thumbnail (`--tissue auto`). Standalone:
`python -m benchmarks.bench_tissue [--quick]`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fresh_process import measure as in_fresh_process  # noqa: E402
from sstream import StreamingCNN  # noqa: E402
from sstream.data import PixelSource  # noqa: E402
from sstream.io import open_image, write_synthetic_slide  # noqa: E402
from sstream.models import (  # noqa: E402
    ModelConfig,
    build_model,
    freeze_batchnorm,
    model_outputs,
    streamed_logits,
)
from sstream.tissue import Tissue, output_mask  # noqa: E402

CASES = {"full": [("tiny", 8192, 256), ("resnet18", 4096, 512)],
         "quick": [("tiny", 2048, 256)]}
TISSUE = 0.2


class _Counting:
    """A PixelSource's reads, counted in pixels."""

    def __init__(self, source: PixelSource) -> None:
        self.source, self.pixels = source, 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.source.shape

    def read(self, box: tuple[int, int, int, int]) -> torch.Tensor:
        y0, y1, x0, x1 = box
        self.pixels += (y1 - y0) * (x1 - x0)
        return self.source.read(box)


def measure(name: str, path: str, tile: int, tissue: str, what: str, reps: int,
            device: torch.device) -> tuple[float, float]:
    """(median seconds, share of the slide's pixels read) of `what` ("predict" or a
    whole-slide training "step") on the slide, finding its tissue each time as the jobs do."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name))
    freeze_batchnorm(model, train_affine=True)
    model.to(device).train(what == "step")
    scnn = StreamingCNN(model.stream, tile)
    times, share = [], 0.0
    for rep in range(reps + 1):  # the first one warms up (and plans)
        began = time.perf_counter()
        with open_image(path) as slide:
            source = PixelSource.from_slide(slide)
            source.tissue = Tissue(tissue).mask_for(slide)
            mask = output_mask(source, scnn)
            counted = _Counting(source)
            if what == "predict":
                model_outputs(model, scnn, counted, mask=mask)
            else:
                logits = streamed_logits(model, scnn, counted, mask)
                F.cross_entropy(logits, torch.tensor([1])).backward()
                model.zero_grad(set_to_none=True)
        if rep:
            times.append(time.perf_counter() - began)
        share = counted.pixels / (source.height * source.width)
    return statistics.median(times), share


def run(quick: bool = False) -> dict:
    kind = "quick" if quick else "full"
    reps = 1 if quick else 2
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, size, tile in CASES[kind]:
            path = str(Path(folder) / f"slide_{size}.tif")
            if not Path(path).exists():
                write_synthetic_slide(path, size, 1, seed=7, tissue_fraction=TISSUE)
            with open_image(path) as slide:
                found = Tissue("auto").mask_for(slide).fraction
            for what in ("predict", "step"):
                timed = {}
                for tissue in ("none", "auto"):
                    timed[tissue] = in_fresh_process("benchmarks.bench_tissue", "measure",
                                                     name, path, tile, tissue, what, reps)
                (none_s, none_read), (auto_s, auto_read) = timed["none"], timed["auto"]
                rows.append([f"{name} {size} px, tile {tile}", what, f"{found:.0%}",
                             round(none_s, 2), round(auto_s, 2), f"{auto_s / none_s:.2f}x",
                             f"{none_read:.0%}", f"{auto_read:.0%}"])
    return {"title": f"Tissue masks: a slide with {TISSUE:.0%} tissue, --tissue auto vs none",
            "columns": ["model, slide", "job", "tissue found", "none s", "auto s",
                        "auto / none", "read (none)", "read (auto)"],
            "rows": rows,
            "notes": [f"step = one whole-slide training step (max pooling); median of {reps} "
                      "after a warm-up, each configuration in a fresh process; auto's time "
                      "includes detecting the tissue on the thumbnail; read = pixels read "
                      "from the slide / its pixels."]}


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
