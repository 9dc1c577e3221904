"""Parallel decoding of a region's tiles, without one lock around every read.

A region of a tiled slide is many independent compressed tiles (JPEG, LZW, deflate, ...).
Decoding them is what a read costs, and the codecs (imagecodecs, OpenSlide's libjpeg) release
the GIL, so a region's tiles decode in parallel on a pool of threads shared by every open
slide. The number of threads is `read_workers` (`sstream --read-workers N`, the environment
variable SSTREAM_READ_WORKERS, default: the cores this process may run on).

`TiffTiles` reads a TIFF page's tiles or strips itself: it fetches their bytes with `os.pread`
(positioned reads on a file descriptor of its own: no seek, so no lock) and decodes them with
the page's tifffile decoder, a share of the tiles per task. Pixels are exactly those tifffile
decodes: the same decoder runs, only on several threads.

Every thread that waits on the pool is a reader (a job's thread or the read-ahead's); the
pool's own tasks never wait on it, so the pool cannot deadlock.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from sstream.errors import InputError

__all__ = ["TiffTiles", "default_read_workers", "run_parallel", "set_read_workers",
           "wait_quietly"]

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_configured_workers: int | None = None
# tasks per worker in one region: a little more than one evens out tiles that decode slower
_TASKS_PER_WORKER = 2


def default_read_workers() -> int:
    """Threads that decode a region: `set_read_workers`'s value, else SSTREAM_READ_WORKERS,
    else the number of cores this process may run on."""
    if _configured_workers is not None:
        return _configured_workers
    text = os.environ.get("SSTREAM_READ_WORKERS", "").strip()
    if text:
        try:
            workers = int(text)
        except ValueError:
            raise InputError(f"SSTREAM_READ_WORKERS must be a whole number, got {text!r}"
                             ) from None
        if workers < 1:
            raise InputError(f"SSTREAM_READ_WORKERS must be at least 1, got {workers}")
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_read_workers(workers: int | None) -> None:
    """Set the decode threads for slides opened from now on (None: back to the default)."""
    global _configured_workers
    if workers is not None and workers < 1:
        raise InputError(f"read workers must be at least 1, got {workers}")
    _configured_workers = workers


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(
                workers, thread_name_prefix="sstream-decode")
        return pool


def run_parallel(tasks: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    """Run `tasks` on `workers` threads (in the calling thread when 1 or a single task) and
    return their results in order. The first exception is raised once every task has
    stopped (none is left writing into a caller's buffer); on KeyboardInterrupt the tasks not
    yet started are cancelled and the running ones finish first."""
    if workers <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    futures: list[Future] = [_pool(workers).submit(task) for task in tasks]
    try:
        for future in futures:
            future.exception()  # waits; interruptible
    except BaseException:
        for future in futures:
            future.cancel()
        for future in futures:  # the first error is the one raised
            wait_quietly(future)
        raise
    return [future.result() for future in futures]


def wait_quietly(future: Future) -> None:
    """Wait until `future` has stopped (at once if it was cancelled), ignoring its error:
    for work the caller has given up on but must not outlive a buffer or a file."""
    if future.cancelled():
        return
    try:
        future.exception()
    except BaseException:  # noqa: S110 - nobody waits for this result any more
        pass


def split_evenly(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    """`items` in at most `parts` contiguous runs of near-equal length."""
    if not items:
        return []
    parts = max(1, min(parts, len(items)))
    size = math.ceil(len(items) / parts)
    return [items[i:i + size] for i in range(0, len(items), size)]


class TiffTiles:
    """The tiles (or strips) of one TIFF page, read and decoded in parallel.

    Serves pages with one image plane: tiled or striped, samples interleaved (or one
    sample), depth 1. `supports(page)` says whether a page qualifies; others are read
    through tifffile's zarr store as before.
    """

    def __init__(self, page: Any, fd: int) -> None:
        keyframe = page.keyframe if getattr(page, "keyframe", None) is not None else page
        self._fd = fd
        self._offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self._counts = np.asarray(page.databytecounts, dtype=np.int64)
        self._decode = keyframe.decode
        self._jpegtables = getattr(keyframe, "jpegtables", None)
        self._jpegheader = getattr(keyframe, "jpegheader", None)
        _, _, self.height, self.width, self.samples = keyframe.shaped
        self.dtype = np.dtype(keyframe.dtype)
        if keyframe.is_tiled:
            self.tile_height, self.tile_width = keyframe.tilelength, keyframe.tilewidth
        else:
            self.tile_height, self.tile_width = keyframe.rowsperstrip, self.width
        self.tiles_across = math.ceil(self.width / self.tile_width)
        self.compression = int(keyframe.compression)
        # baseline JPEG tiles of YCbCr colour (TIFF's usual): any JPEG decoder reads them as
        # complete files once the shared tables are put back in (`jpeg_file`)
        self.plain_jpeg = (self.compression == 7 and keyframe.is_tiled
                           and int(keyframe.photometric) == 6 and self.samples == 3
                           and self.dtype == np.uint8)
        self._jpeg_args = _jpeg_arguments(keyframe) if keyframe.is_tiled else None
        if self._jpeg_args is not None:
            import imagecodecs  # on the first TIFF opened, as tifffile is

            self._jpeg_decode = imagecodecs.jpeg_decode

    @staticmethod
    def supports(level_series: Any) -> bool:
        """One page of one plane, samples interleaved, with data to read."""
        pages = level_series.pages
        if len(pages) != 1 or pages[0] is None:
            return False
        page = pages[0]
        keyframe = page.keyframe if getattr(page, "keyframe", None) is not None else page
        separate, depth = keyframe.shaped[0], keyframe.shaped[1]
        return (separate == 1 and depth == 1 and keyframe.imagedepth == 1
                and getattr(keyframe, "jpegheader", None) is None  # NDPI's strips: tifffile
                and len(page.dataoffsets) > 0)

    def segments(self, y0: int, y1: int, x0: int, x1: int) -> list[int]:
        """Indices of the tiles or strips that cover rows [y0, y1) x columns [x0, x1)."""
        rows = range(y0 // self.tile_height, (y1 - 1) // self.tile_height + 1)
        cols = range(x0 // self.tile_width, (x1 - 1) // self.tile_width + 1)
        return [r * self.tiles_across + c for r in rows for c in cols]

    def segment_box(self, index: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of segment `index` in the page, clipped to the image."""
        row, col = divmod(index, self.tiles_across)
        y0, x0 = row * self.tile_height, col * self.tile_width
        return (y0, min(y0 + self.tile_height, self.height),
                x0, min(x0 + self.tile_width, self.width))

    def segment_bytes(self, index: int) -> bytes | None:
        """The compressed bytes of segment `index` (None for a sparse, unwritten one)."""
        return _read_segment(self._fd, int(self._offsets[index]), int(self._counts[index]))

    def jpeg_file(self, index: int) -> bytes | None:
        """Segment `index` as a complete JPEG file (the JPEGTables tag's tables spliced in
        after its start marker), for decoders that take files; None for a sparse tile."""
        data = self.segment_bytes(index)
        if data is None or not self._jpegtables:
            return data
        return data[:2] + bytes(self._jpegtables)[2:-2] + data[2:]

    def read(self, y0: int, y1: int, x0: int, x1: int, workers: int) -> np.ndarray:
        """Rows [y0, y1) x columns [x0, x1) as (h, w, samples) in the file's dtype; sparse
        tiles read as 0, as tifffile reads them.

        The tiles' places are worked out for the whole region at once (numpy), so that a
        task's loop does little besides reading, decoding and copying: with many threads,
        the Python a tile costs holds the GIL that every other thread needs. Each task
        decodes its run of segments and copies the part of each inside the region into
        place; numpy copies without the GIL, so the copies run in parallel too. (JPEG tiles
        are decoded into a new array each: imagecodecs' jpeg_decode with `out=` decodes
        about 40% slower, one thread or several.)"""
        out = np.empty((y1 - y0, x1 - x0, self.samples), dtype=self.dtype)
        placements = self._placements(self.segments(y0, y1, x0, x1), y0, y1, x0, x1)
        run_parallel([lambda run=run: self._decode_run(run, out) for run in split_evenly(
            placements, workers * _TASKS_PER_WORKER)], workers)
        return out

    def _placements(self, segments: list[int], y0: int, y1: int, x0: int, x1: int
                    ) -> list[tuple[int, ...]]:
        """For each segment: (index, file offset, byte count, then rows and columns of its
        part in the region, then the same part's rows and columns in the segment)."""
        index = np.asarray(segments, dtype=np.int64)
        row, col = np.divmod(index, self.tiles_across)
        ty0, tx0 = row * self.tile_height, col * self.tile_width
        iy0, iy1 = np.maximum(ty0, y0), np.minimum(np.minimum(ty0 + self.tile_height,
                                                              self.height), y1)
        ix0, ix1 = np.maximum(tx0, x0), np.minimum(np.minimum(tx0 + self.tile_width,
                                                              self.width), x1)
        columns = (index, self._offsets[index], self._counts[index], iy0 - y0, iy1 - y0,
                   ix0 - x0, ix1 - x0, iy0 - ty0, iy1 - ty0, ix0 - tx0, ix1 - tx0)
        return list(zip(*(c.tolist() for c in columns), strict=True))

    def _decode_run(self, placements: Sequence[tuple[int, ...]], out: np.ndarray) -> None:
        """Read, decode and copy into `out` each segment of `placements` (`_placements`)."""
        for index, offset, count, oy0, oy1, ox0, ox1, sy0, sy1, sx0, sx1 in placements:
            data = _read_segment(self._fd, offset, count)
            if data is None:  # a sparse tile
                out[oy0:oy1, ox0:ox1] = 0
                continue
            out[oy0:oy1, ox0:ox1] = self._decode_segment(index, data)[sy0:sy1, sx0:sx1]

    def _decode_segment(self, index: int, data: bytes) -> np.ndarray:
        """Segment `index`'s pixels as (length, width, samples)."""
        if self._jpeg_args is not None:
            tile = self._jpeg_decode(data, **self._jpeg_args)
            return tile if tile.ndim == 3 else tile[..., None]  # one sample: (l, w, 1)
        tile, _, _ = self._decode(data, index, jpegtables=self._jpegtables,
                                  jpegheader=self._jpegheader)
        return tile.reshape(tile.shape[-3:])  # (length, width, samples) of depth 1


def _read_segment(fd: int, offset: int, count: int) -> bytes | None:
    """`count` bytes at `offset` of the file (a positioned read: no seek, so no lock); None
    for a sparse, unwritten segment."""
    if offset <= 0 or count <= 0:
        return None
    data = os.pread(fd, count, offset)
    if len(data) != count:
        raise OSError(f"file ends inside a tile ({len(data)} of {count} bytes read)")
    return data


def _jpeg_arguments(keyframe: Any) -> dict[str, Any] | None:
    """imagecodecs.jpeg_decode's arguments for the page's JPEG tiles, as tifffile passes
    them (so the pixels are tifffile's); None for other compressions or where tifffile does
    not say how it decodes JPEG."""
    if int(keyframe.compression) != 7 or getattr(keyframe, "jpegheader", None) is not None:
        return None
    import tifffile

    colorspace_of = getattr(getattr(tifffile, "tifffile", None), "jpeg_decode_colorspace", None)
    if colorspace_of is None:
        return None
    colorspace, outcolorspace = colorspace_of(keyframe.photometric, keyframe.planarconfig,
                                              keyframe.extrasamples, keyframe.is_jfif)
    return {"bitspersample": keyframe.bitspersample, "tables": keyframe.jpegtables,
            "colorspace": colorspace, "outcolorspace": outcolorspace}
