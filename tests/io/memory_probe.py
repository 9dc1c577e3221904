"""Peak-memory probe run in a subprocess by test_memory.py (and usable by hand).

`python tests/io/memory_probe.py write|read PATH SIZE DTYPE` prints one JSON line with the
resident-set growth in MB. sstream.io is imported without sstream/__init__ and with torch
blocked, so the figure is the I/O code's own (and this also proves io never imports torch).
"""

import json
import sys
import time
import types
from pathlib import Path


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _import_io():
    if "sstream.io" in sys.modules:
        return sys.modules["sstream.io"]
    root = Path(__file__).resolve().parents[2]
    package = types.ModuleType("sstream")
    package.__path__ = [str(root / "sstream")]
    sys.modules["sstream"] = package
    sys.modules["torch"] = None  # any `import torch` now fails
    import importlib

    return importlib.import_module("sstream.io")


def write_map(path: str, size: int, dtype: str) -> None:
    """Stream a size x size map (a cheap smooth pattern) into a pyramidal TIFF."""
    import numpy as np

    sio = _import_io()
    band_rows = 300  # deliberately not a multiple of the tile size
    stripes = ((np.arange(size) // 1000) % 2).astype(dtype)  # (size,) vertical stripes
    with sio.TiffMapWriter(
        path, (size, size), dtype=dtype, tile_size=512, compression_level=1
    ) as writer:
        for y0 in range(0, size, band_rows):
            rows = min(band_rows, size - y0)
            value = 200 if (y0 // 1000) % 2 else 100
            writer.write_band(y0, np.broadcast_to(stripes * value, (rows, size)))


def read_all(path: str, region: int) -> int:
    """Read every region x region window of every level; return the number of reads."""
    sio = _import_io()
    reads = 0
    with sio.open_image(path) as slide:
        for level, (w, h) in enumerate(slide.level_dimensions):
            ds = slide.level_downsamples[level]
            for y in range(0, h, region):
                for x in range(0, w, region):
                    out = slide.read_region((int(x * ds), int(y * ds)), level, (region, region))
                    assert out.shape == (region, region, 3)
                    reads += 1
    return reads


def main() -> None:
    mode, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import numpy  # noqa: F401  (baseline includes the libraries themselves)
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    _import_io()
    baseline = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    start = time.perf_counter()
    if mode == "write":
        write_map(path, size, sys.argv[4])
        extra = {}
    else:
        extra = {"reads": read_all(path, int(sys.argv[4]))}
    seconds = time.perf_counter() - start
    peak = _rss_mb("VmHWM")
    print(
        json.dumps(
            {
                "baseline_mb": baseline,
                "peak_mb": peak,
                "growth_mb": peak - baseline,
                "seconds": seconds,
                **extra,
            }
        )
    )


if __name__ == "__main__":
    main()
