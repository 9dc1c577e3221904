"""The cost of reading at an exact µm per pixel: a whole-slide predict that resamples against
one that reads a native level of the same output size (issue 28's goal: at most 1.2x).

Two scans of one field, both JPEG-tiled like a scanner's: the 0.25 µm/px scan has no level
at 0.5 µm/px (its level 0 is read and halved by the antialiased resampler,
`sstream.io.resample`), the 0.5 µm/px scan is read as it is. A tiny model (the cheapest,
so the worst case for the ratio) that records `--mpp 0.5` predicts each (tissue none, so
both compute every tile); the read alone (every tile's region through the source, no model)
is timed too. Native and resampled runs alternate, each in a fresh process; the ratio is
the median of PAIRS pairwise ratios (robust to a machine whose load drifts), the seconds
the best of each. Sizes (output side): quick 1024 px, full 4096 px.

`python benchmarks/bench_resample.py [--quick]` prints the table alone.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fresh_process import measure  # noqa: E402
from sstream.io import TiffMapWriter, open_image, write_synthetic_slide  # noqa: E402

MPP = 0.5
TILE = 512
PAIRS = 3


def _write_scans(folder: Path, side: int) -> tuple[Path, Path]:
    """(0.25 µm/px scan without a 0.5 level, 0.5 µm/px scan): the second is synthetic, the
    first its 2x bicubic enlargement, written in bands (JPEG tiles, level 0 only)."""
    from PIL import Image

    native = folder / "native_0.5.tif"
    write_synthetic_slide(native, side, 1, 0, tile=TILE, mpp=MPP)
    fine = folder / "fine_0.25.tif"
    band = 256  # rows of the 0.5 scan per band
    with open_image(native) as slide, TiffMapWriter(
            fine, (2 * side, 2 * side, 3), np.uint8, tile_size=TILE, mpp=MPP / 2,
            compression="jpeg", compression_level=90, levels=1) as writer:
        for y0 in range(0, side, band):
            rows = slide.read_region((0, y0), 0, (side, min(band, side - y0)))
            enlarged = Image.fromarray(rows).resize((2 * side, 2 * rows.shape[0]),
                                                    Image.Resampling.BICUBIC)
            writer.write_band(2 * y0, np.asarray(enlarged))
    return fine, native


def predict_seconds(slide: str, checkpoint: str, device: torch.device) -> float:
    """(In a fresh process.) Seconds of `predict` of one slide with the checkpoint's read."""
    from sstream.predict import PredictConfig, predict

    began = time.perf_counter()
    result = predict(PredictConfig(checkpoint, [slide], device=str(device), tile_size=TILE))
    assert not result.failures, result.failures
    return time.perf_counter() - began


def read_seconds(slide: str, device: torch.device) -> float:
    """(In a fresh process.) Seconds to read every TILE x TILE region of the slide at MPP
    through its PixelSource, as the engine's tiles would (no model)."""
    from sstream.reading import ReadSpec

    began = time.perf_counter()
    with ReadSpec(mpp=MPP).open(slide, read_ahead=0) as read:
        source = read.source
        for y0 in range(0, source.height, TILE):
            for x0 in range(0, source.width, TILE):
                source.read((y0, min(y0 + TILE, source.height), x0,
                             min(x0 + TILE, source.width)))
    return time.perf_counter() - began


def _paired(function: str, native: Path, resampled: Path, *args: object
            ) -> tuple[float, float, float]:
    """(best native s, best resampled s, median of the pairwise ratios)."""
    pairs = [[measure("benchmarks.bench_resample", function, str(path), *args)[0]
              for path in (native, resampled)] for _ in range(PAIRS)]
    return (min(p[0] for p in pairs), min(p[1] for p in pairs),
            float(np.median([p[1] / p[0] for p in pairs])))


def run(quick: bool = False) -> dict:
    from sstream.models import ModelConfig, build_model, checkpoint_payload

    side = 1024 if quick else 4096
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fine, native = _write_scans(Path(tmp), side)
        torch.manual_seed(0)
        model = build_model(ModelConfig("tiny", 2, read={"mpp": MPP}, tissue="none"))
        checkpoint = Path(tmp) / "tiny_mpp05.pt"
        torch.save(checkpoint_payload(model), checkpoint)
        for what, function, args in (("predict (tiny)", "predict_seconds", (str(checkpoint),)),
                                     ("read only", "read_seconds", ())):
            native_s, resampled_s, ratio = _paired(function, native, fine, *args)
            rows.append([what, f"{side} x {side}", round(native_s, 2), round(resampled_s, 2),
                         round(ratio, 2)])
    return {
        "title": f"Reading at exactly {MPP} µm/px: resampling 0.25 µm/px vs a native level",
        "columns": ["job", "image read", "native s", "resampled s", "ratio"],
        "rows": rows,
        "notes": [f"resampled: the 0.25 µm/px scan's level 0 ({2 * side} px, JPEG tiles) "
                  "halved by the antialiased bicubic resampler, region by region with the "
                  "filter's margin; native: a 0.5 µm/px scan read as it is. Tile "
                  f"{TILE}; {PAIRS} alternating pairs of fresh processes (seconds: the "
                  "best; ratio: the median pairwise ratio)."],
    }


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
