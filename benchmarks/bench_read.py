"""Reading against the machine's own decode limit, and hidden behind compute.

(a) Decode throughput: the same random 2048 px regions of a JPEG-tiled slide (256 px tiles)
    read by sstream's reader with N decode threads, against raw imagecodecs decoding the same
    tiles (bytes already in memory) on a pool of N threads: the most N threads can decode.
    Goal: sstream at least 0.8x the raw pool at every N.
(b) A whole-slide predict of `tiny` on a JPEG slide (16384 px; quick: 6144 px): wall time with
    read-ahead, against compute alone (the same slide decoded beforehand, in memory) and decode
    alone (every region the forward reads, all threads). Where compute and decode share the
    CPU's cores, the goal is wall <= 1.05x (compute + decode): nothing lost to serialisation;
    where compute runs on a GPU, wall <= 1.15x max(compute, decode).

Every configuration runs in a fresh process (`fresh_process.measure`). `python
benchmarks/bench_read.py [--quick]` prints the table alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGION = 2048
TILE = 256


def cores() -> int:
    return len(os.sched_getaffinity(0))


def worker_counts() -> list[int]:
    """1, 2, 4, ... up to the cores available (and the cores themselves)."""
    counts, n = [], 1
    while n < cores():
        counts.append(n)
        n *= 2
    return counts + [cores()]


def make_slide(path: Path, side: int) -> Path:
    from sstream.io import write_synthetic_slide

    if not path.exists():
        write_synthetic_slide(path, side, label=1, seed=0, tile=TILE)
    return path


def regions(side: int, count: int, region: int = REGION, seed: int = 0) -> list[tuple]:
    """`count` random (y0, y1, x0, x1) level-0 regions of a side x side slide."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, side - region, size=(count, 2))
    return [(int(y), int(y) + region, int(x), int(x) + region) for y, x in starts]


def sstream_mps(path: str, side: int, count: int, workers: int, device=None,
                region: int = REGION) -> float:
    """MP/s of sstream's read_region over `count` random region² regions, `workers` decode
    threads."""
    from sstream.io import open_image

    boxes = regions(side, count, region)
    with open_image(path, read_workers=workers) as slide:
        slide.read_region((0, 0), 0, (region, region))  # caches warm
        start = time.perf_counter()
        for y0, y1, x0, x1 in boxes:
            slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
        seconds = time.perf_counter() - start
    return count * region * region / 1e6 / seconds


def raw_mps(path: str, side: int, count: int, workers: int, device=None,
            region: int = REGION) -> float:
    """MP/s of imagecodecs decoding the regions' tiles on a pool of `workers` threads, the
    compressed bytes read beforehand: the decode limit of `workers` threads."""
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        tables = page.jpegtables
        offsets, counts = page.dataoffsets, page.databytecounts
        across = -(-page.imagewidth // page.tilewidth)
        fh = tf.filehandle
        jobs = []
        for y0, y1, x0, x1 in regions(side, count, region):
            tiles = [r * across + c for r in range(y0 // TILE, (y1 - 1) // TILE + 1)
                     for c in range(x0 // TILE, (x1 - 1) // TILE + 1)]
            data = []
            for index in tiles:
                fh.seek(offsets[index])
                data.append(fh.read(counts[index]))
            jobs.append(data)
    pool = ThreadPoolExecutor(workers)

    def decode(data: bytes) -> None:
        imagecodecs.jpeg_decode(data, tables=tables)

    list(pool.map(decode, jobs[0][:workers]))  # threads started
    start = time.perf_counter()
    for data in jobs:
        list(pool.map(decode, data))
    seconds = time.perf_counter() - start
    pool.shutdown()
    return count * region * region / 1e6 / seconds


def predict_seconds(path: str, tile: int, mode: str, device=None, read_ahead: int = 2,
                    decoder: str = "cpu") -> float:
    """Seconds of one whole-slide forward of `tiny` (max pooling) on the slide: mode "wall"
    reads lazily with `read_ahead` regions decoded ahead (by `decoder`: "cpu" or "nvjpeg"),
    "compute" runs on the slide decoded beforehand, "decode" only reads every region the
    forward reads (all threads), "serial" reads lazily without read-ahead."""
    os.environ["SSTREAM_JPEG_DECODER"] = decoder
    import torch

    from sstream.data import PixelSource
    from sstream.engine import StreamingCNN
    from sstream.io import open_image
    from sstream.models import ModelConfig, build_model, streamed_logits

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", num_classes=2)).to(device).eval()
    scnn = StreamingCNN(model.stream, tile)
    with open_image(path) as slide:
        if mode == "compute":
            source = PixelSource.from_array(slide.read_level(0))
        else:
            source = PixelSource.from_slide(slide, 0,
                                            read_ahead=0 if mode == "serial" else read_ahead)
        scnn.halo_program(source.shape, training=False)  # planned, as by a first forward
        boxes = scnn.pooled_reads(source.shape)  # the regions the pooled forward reads
        y0, y1, x0, x1 = boxes[0]
        slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0))  # caches warm
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if mode == "decode":
            for y0, y1, x0, x1 in boxes:  # the forward's reads, decode only
                slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
        else:
            with torch.no_grad():
                streamed_logits(model, scnn, source)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start


def run(quick: bool = False) -> dict:
    from benchmarks.fresh_process import measure

    side = 6144 if quick else 16384
    count = 4 if quick else 12
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_slide(Path(tmp) / "slide.tif", side))
        for workers in worker_counts():
            ours = measure("benchmarks.bench_read", "sstream_mps", path, side, count, workers)[0]
            raw = measure("benchmarks.bench_read", "raw_mps", path, side, count, workers)[0]
            rows.append([f"decode 2048² regions, {workers} thread(s)", f"{ours:.0f}",
                         f"{raw:.0f}", f"{ours / raw:.2f}x", "goal >= 0.8x"])
        tile = 1024
        wall, serial, compute, decode = (
            measure("benchmarks.bench_read", "predict_seconds", path, tile, mode)[0]
            for mode in ("wall", "serial", "compute", "decode"))
        rows.append([f"predict tiny {side}² tile {tile}: read-ahead", f"{wall:.1f} s",
                     f"compute {compute:.1f} s + decode {decode:.1f} s",
                     f"{wall / (compute + decode):.2f}x the sum, "
                     f"{wall / max(compute, decode):.2f}x the max",
                     "goal (CPU) <= 1.05x the sum"])
        rows.append([f"predict tiny {side}² tile {tile}: no read-ahead", f"{serial:.1f} s", "",
                     f"{serial / (compute + decode):.2f}x the sum", ""])
    return {
        "title": f"Reading: sstream's reader against raw decoding ({cores()} cores)",
        "columns": ["measurement", "sstream (MP/s or s)", "raw pool (MP/s) / parts",
                    "ratio", "goal"],
        "rows": rows,
        "notes": ["decode: JPEG 256 px tiles, quality 90, random 2048² regions at level 0; "
                  "raw = imagecodecs.jpeg_decode on a thread pool, bytes in memory",
                  "predict: compute = the same forward on the slide decoded beforehand; "
                  "decode = the forward's crop reads alone; each in a fresh process"],
    }


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
