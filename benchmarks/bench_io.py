"""I/O throughput: random region reads from a JPEG pyramid, streamed pyramidal map writes.

`run(quick)` returns the table `benchmarks/run.py` prints; `python benchmarks/bench_io.py
[--quick]` prints it alone. Sizes: quick 3072 px slides/maps, full 12288 px.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sstream.io import TiffMapWriter, open_image, write_synthetic_slide  # noqa: E402


def _read_throughput(path: Path, level: int, region: int, reads: int, seed: int = 0):
    """MP/s and ms/read of `reads` random region x region reads at `level`."""
    rng = np.random.default_rng(seed)
    with open_image(path) as slide:
        w, h = slide.level_dimensions[level]
        ds = slide.level_downsamples[level]
        slide.read_region((0, 0), level, (region, region))  # open-time caches warm
        start = time.perf_counter()
        for _ in range(reads):
            x, y = rng.integers(0, max(w - region, 1)), rng.integers(0, max(h - region, 1))
            slide.read_region((int(x * ds), int(y * ds)), level, (region, region))
        seconds = time.perf_counter() - start
    return reads * region * region / 1e6 / seconds, 1e3 * seconds / reads


def _write_throughput(path: Path, side: int, dtype, compression: str):
    """MP/s of streaming a side x side map (noisy smooth content) in 300-row bands."""
    rng = np.random.default_rng(0)
    band_rows = 300
    x = np.linspace(0, 20, side, dtype=np.float32)
    start = time.perf_counter()
    with TiffMapWriter(path, (side, side), dtype, tile_size=512, compression=compression) as w:
        for y0 in range(0, side, band_rows):
            rows = min(band_rows, side - y0)
            band = np.sin(x[None, :] + np.float32(y0 / 500)) * 0.5 + 0.5
            band = band + rng.random((rows, side), dtype=np.float32) * 0.01
            if dtype == np.uint8:
                band = (band * 255).astype(np.uint8)
            w.write_band(y0, np.broadcast_to(band, (rows, side)) if band.shape[0] == 1 else band)
    seconds = time.perf_counter() - start
    return side * side / 1e6 / seconds, path.stat().st_size / 1e6


def run(quick: bool = False) -> dict:
    side = 3072 if quick else 12288
    reads = 30 if quick else 200
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        slide_path = Path(tmp) / "slide.tif"
        start = time.perf_counter()
        write_synthetic_slide(slide_path, side, label=1, seed=0, tile=256)
        gen_mps = side * side / 1e6 / (time.perf_counter() - start)
        rows.append(["write synthetic RGB JPEG slide", f"{side}²", f"{gen_mps:.1f}", ""])
        for level, region in ((0, 512), (0, 2048), (1, 512), (2, 512)):
            mps, ms = _read_throughput(slide_path, level, region, reads)
            rows.append(
                [
                    f"read_region {region}² level {level} (JPEG, RGB)",
                    f"{side}²",
                    f"{mps:.1f}",
                    f"{ms:.1f} ms/read",
                ]
            )
        for dtype, compression in (
            (np.float32, "deflate"),
            (np.uint8, "deflate"),
            (np.float32, "lzw"),
        ):
            name = np.dtype(dtype).name
            path = Path(tmp) / f"map_{name}_{compression}.tif"
            mps, mb = _write_throughput(path, side, dtype, compression)
            rows.append(
                [
                    f"TiffMapWriter {name} {compression} + pyramid",
                    f"{side}²",
                    f"{mps:.1f}",
                    f"{mb:.1f} MB file",
                ]
            )
    return {
        "title": "sstream.io throughput (MP/s, single thread of work)",
        "columns": ["operation", "image", "MP/s", "detail"],
        "rows": rows,
        "notes": [
            "reads: random regions, one SlideImage, decode + RGB conversion included",
            "writes: 300-row full-width bands in, 512 px tiles and all levels out",
        ],
    }


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
