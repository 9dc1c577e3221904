"""Decoding regions in worker processes: reading that does not share the interpreter.

Decode threads (`sstream.io.parallel`) keep up while the main thread computes inside torch's
C++ code, which releases the interpreter. A thread that drives a GPU is different: it runs
Python nearly all the time, launching small kernels, and every return of a decode thread from
its codec queues for the interpreter lock behind it and interrupts it. On a fast GPU that
costs more than decoding saves (measured: see README, "Reading that keeps up").

`ProcessDecoder.read(slide, level, location, size, fill)` cuts a region into bands of whole
tile rows, one per worker process; each process reads its band with the ordinary reader (one
thread, its own handle of the slide, kept open for the next regions) straight into a shared
memory block, and the region is copied out of it once. The pixels are the reader's own: the
same code reads them, in another process.

The workers are started once (`spawn`, safe with CUDA and threads) and live as long as this
process; `sstream --read-processes N` (SSTREAM_READ_PROCESSES) turns them on.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import shared_memory
from typing import Any

import numpy as np

__all__ = ["ProcessDecoder", "default_read_processes"]

_DECODERS: dict[int, ProcessDecoder] = {}
_DECODERS_LOCK = threading.Lock()
_OPEN_PER_WORKER = 8  # slides a worker keeps open between regions


def default_read_processes() -> int:
    """Worker processes that decode regions: SSTREAM_READ_PROCESSES, else 0 (threads)."""
    text = os.environ.get("SSTREAM_READ_PROCESSES", "").strip()
    if not text:
        return 0
    try:
        processes = int(text)
    except ValueError:
        raise ValueError(f"SSTREAM_READ_PROCESSES must be a whole number, got {text!r}"
                         ) from None
    if processes < 0:
        raise ValueError(f"SSTREAM_READ_PROCESSES must be 0 or more, got {processes}")
    return processes


class ProcessDecoder:
    """A pool of `processes` worker processes that read bands of regions."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = ProcessPoolExecutor(processes,
                                         mp_context=multiprocessing.get_context("spawn"))

    @classmethod
    def shared(cls, processes: int) -> ProcessDecoder:
        """The process-wide decoder with `processes` workers (started on first use)."""
        with _DECODERS_LOCK:
            decoder = _DECODERS.get(processes)
            if decoder is None:
                decoder = _DECODERS[processes] = cls(processes)
            return decoder

    def read(self, path: str, backend: str, level: int,
             bands: list[tuple[tuple[int, int], tuple[int, int]]], fill: int) -> np.ndarray:
        """The bands (level-0 location, (width, height) in pixels of `level`), read by the
        workers and stacked top to bottom, as one (h, w, 3) uint8 array."""
        height, width = sum(size[1] for _, size in bands), bands[0][1][0]
        block = shared_memory.SharedMemory(create=True, size=max(1, height * width * 3))
        try:
            rows = np.cumsum([0] + [size[1] for _, size in bands])
            futures: list[Future] = [
                self._pool.submit(_read_band, path, backend, level, location, size, fill,
                                  block.name, (height, width), int(row))
                for (location, size), row in zip(bands, rows)]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                for future in futures:  # none may still write into the block
                    if not future.cancelled():
                        future.exception()
                raise
            return np.ndarray((height, width, 3), np.uint8, buffer=block.buf).copy()
        finally:
            block.close()
            block.unlink()


_OPEN: dict[tuple[str, str], Any] = {}


def _read_band(path: str, backend: str, level: int, location: tuple[int, int],
               size: tuple[int, int], fill: int, block_name: str, shape: tuple[int, int],
               row: int) -> None:
    """(In a worker.) Read one band and write it into the shared block at `row`."""
    from sstream.io.reader import open_image

    key = (path, backend)
    slide = _OPEN.get(key)
    if slide is None:
        if len(_OPEN) >= _OPEN_PER_WORKER:
            _OPEN.pop(next(iter(_OPEN))).close()
        slide = _OPEN[key] = open_image(path, backend, read_workers=1)
    band = slide.read_region(location, level, size, fill)
    block = _attach(block_name)
    try:
        region = np.ndarray((*shape, 3), np.uint8, buffer=block.buf)
        region[row:row + band.shape[0]] = band
        del region
    finally:
        block.close()


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open the parent's block. (A spawned worker shares the parent's resource tracker, so
    registering the block again there is harmless: the parent unlinks it.)"""
    try:
        return shared_memory.SharedMemory(name=name, track=False)
    except TypeError:  # Python < 3.13
        return shared_memory.SharedMemory(name=name)


def band_edges(y0: int, y1: int, tile_rows: int, processes: int) -> list[int]:
    """Rows y0 < ... < y1 that cut [y0, y1) into at most about `processes` bands whose inner
    edges fall on tile rows (multiples of `tile_rows`), so no tile is decoded twice."""
    tiles = max(1, math.ceil((y1 - y0) / tile_rows))
    step = tile_rows * max(1, math.ceil(tiles / processes))
    inner = range((y0 // step + 1) * step, y1, step)
    return [y0, *inner, y1]
