"""Streaming writer of tiled pyramidal BigTIFFs (prediction maps, saliency maps, slides).

`TiffMapWriter` receives full-width horizontal bands of any height, top to bottom, and never
holds the whole image: it assembles one row of tiles at a time.

Layout (what ASAP, QuPath and OpenSlide's generic-tiff reader open):

- BigTIFF, tiles of `tile_size` (256 or 512) pixels, deflate (TIFF code 32946, accepted by
  ASAP), LZW, zstd, none, or JPEG for RGB uint8.
- level 0 first (`subfiletype=0`, with the optional `description` as ImageDescription), then
  every reduced level as a top-level page marked `subfiletype=1`; with `ome=True` an
  OME-TIFF whose reduced levels are SubIFDs of level 0 (the OME pyramid convention).
- resolution in centimetres (`ResolutionUnit=3`), so the slide's mpp carries over; reduced
  levels carry their own, coarser resolution.

Reduced levels: level k+1 has size ceil(h_k / 2) x ceil(w_k / 2); each pixel is the mean of
the (up to) 2 x 2 level-k pixels it covers (edge pixels average what exists), in float32
for float maps and rounded half up, `(sum + 2) // 4`, for uint8. Levels are added until
the smallest fits in one tile (or `levels` is given).

Memory: the pyramid is computed from the band stream as it arrives, but TIFF wants level 0
complete before level 1, so reduced levels (1/3 of level 0's size, uncompressed) are spooled
to raw files in a temporary directory next to the output and compressed into the TIFF at
`close()`. Level 0 is compressed as it streams, by a background thread running tifffile's
tile-iterator writer. Peak RAM is about two rows of tiles of level 0.

The TIFF is written to a temporary sibling and renamed on success (`atomic_output`); an
exception inside the `with` block, or closing before all rows arrived, leaves no file.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sstream.errors import InputError
from sstream.io.atomic import atomic_output

__all__ = ["COMPRESSIONS", "TiffMapWriter", "pyramid_shapes", "downsample_2x2"]

# name -> TIFF Compression tag value
COMPRESSIONS = {"deflate": 32946, "lzw": 5, "zstd": 50000, "jpeg": 7, "none": 1}

_ABORT = object()


def pyramid_shapes(height: int, width: int, tile_size: int, levels: int | None = None):
    """(height, width) of every level: halved (rounded up) until one tile holds the level."""
    shapes = [(height, width)]
    while (levels is None and max(shapes[-1]) > tile_size) or (
        levels is not None and len(shapes) < levels
    ):
        h, w = shapes[-1]
        if h == 1 and w == 1:
            break
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample_2x2(rows: np.ndarray) -> np.ndarray:
    """Halve (2m, w[, c]) rows to (m, ceil(w / 2)[, c]) by the 2 x 2 mean.

    An odd last column is replicated, which makes edge pixels the mean of what exists.
    float: mean in float32; uint8: rounded half up.
    """
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, rows[:, -1:]], axis=1)
    if rows.dtype == np.uint8:
        s = rows.astype(np.uint16)
        total = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
        return ((total + 2) // 4).astype(np.uint8)
    r = rows.astype(np.float32, copy=False)
    return ((r[0::2, 0::2] + r[0::2, 1::2]) + (r[1::2, 0::2] + r[1::2, 1::2])) * np.float32(0.25)


class TiffMapWriter:
    """Write a map (or RGB image) of arbitrary size to a tiled pyramidal BigTIFF, band by band.

    Usage::

        with TiffMapWriter("map.tif", shape=(h, w), dtype=np.float32, mpp=0.5) as writer:
            for y0, band in bands:          # full-width bands, top to bottom, any height
                writer.write_band(y0, band)

    Args:
        path: output file (written atomically).
        shape: (height, width) for a single-channel map, or (height, width, 3) for RGB uint8.
        dtype: float32 or uint8 (RGB: uint8).
        tile_size: tile edge in pixels, a multiple of 16 (256 or 512 for viewers).
        mpp: microns per level-0 pixel, stored as resolution in centimetres.
        description: ImageDescription of level 0 (e.g. a JSON record). Not with `ome`.
        compression: "deflate" (default), "lzw", "zstd", "none", or "jpeg" (uint8 only).
        compression_level: codec level (deflate 1-9, zstd, jpeg quality); None = default.
        levels: number of pyramid levels including level 0; None = until one tile fits.
        overwrite: replace an existing file.
        ome: write OME-TIFF with SubIFD pyramid levels instead of top-level reduced pages.

    Raises:
        FileExistsError: `path` exists and not `overwrite`.
        ValueError: bad shape, dtype, tile size or compression; bands out of order or of
            the wrong width; `close()` before all rows were written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, ...],
        dtype=np.float32,
        tile_size: int = 256,
        mpp: float | None = None,
        description: str | None = None,
        compression: str = "deflate",
        compression_level: int | None = None,
        levels: int | None = None,
        overwrite: bool = False,
        ome: bool = False,
    ):
        import tifffile

        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
            raise InputError(f"shape must be (h, w) or (h, w, 3), got {shape}")
        if min(shape[:2]) <= 0:
            raise InputError(f"shape must be positive, got {shape}")
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
            raise InputError(f"dtype must be float32 or uint8, got {self.dtype}")
        self.channels = 3 if len(shape) == 3 else 1
        if self.channels == 3 and self.dtype != np.uint8:
            raise InputError("RGB images must be uint8")
        if tile_size <= 0 or tile_size % 16:
            raise InputError(f"tile_size must be a positive multiple of 16, got {tile_size}")
        if compression not in COMPRESSIONS:
            raise InputError(f"compression must be one of {sorted(COMPRESSIONS)}")
        if compression == "jpeg" and self.dtype != np.uint8:
            raise InputError("jpeg compression needs uint8 data")
        if ome and description is not None:
            raise InputError("description is not supported with ome=True (OME-XML owns it)")
        if levels is not None and levels < 1:
            raise InputError(f"levels must be >= 1, got {levels}")
        if mpp is not None and not mpp > 0:
            raise InputError(f"mpp must be positive, got {mpp}")
        self.height, self.width = int(shape[0]), int(shape[1])
        self.tile_size = int(tile_size)
        self.mpp = mpp
        self.ome = ome
        self.level_shapes = pyramid_shapes(self.height, self.width, self.tile_size, levels)
        self._compression = COMPRESSIONS[compression]
        self._compression_level = compression_level
        self._description = description
        self._rows_in = 0
        self._closed = False

        self._atomic = atomic_output(self.path, overwrite=overwrite)
        tmp_path = self._atomic.__enter__()
        try:
            self._spool_dir = tempfile.TemporaryDirectory(
                prefix=f".{self.path.name}.levels.", dir=self.path.parent
            )
            self._spools = [
                open(Path(self._spool_dir.name) / f"level{k}.raw", "wb")
                for k in range(1, len(self.level_shapes))
            ]
            self._carry: list[np.ndarray | None] = [None] * len(self.level_shapes)
            c = (self.channels,) if self.channels == 3 else ()
            self._tile_row = np.empty((self.tile_size, self.width, *c), self.dtype)
            self._tile_row_fill = 0
            self._tile_rows: queue.Queue = queue.Queue(maxsize=1)
            self._thread_error: BaseException | None = None
            self._tiff = tifffile.TiffWriter(tmp_path, bigtiff=True, ome=ome)
            self._thread = threading.Thread(target=self._write_level0, daemon=True)
            self._thread.start()
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise

    # ---- public ---------------------------------------------------------------------------

    def write_band(self, y0: int, band: np.ndarray) -> None:
        """Append a full-width band (bh, width[, 3]) whose first row is row `y0`.

        Bands must arrive top to bottom without gaps (`y0` = rows written so far). Values
        are cast to the writer's dtype; integer values outside uint8's range are an error.
        """
        if self._closed:
            raise InputError(f"{self.path}: writer is closed")
        band = np.asarray(band)
        expected = (self.width, self.channels) if self.channels == 3 else (self.width,)
        if band.ndim != 1 + len(expected) or band.shape[1:] != expected:
            raise InputError(
                f"band must have shape (rows, {', '.join(map(str, expected))}), got {band.shape}"
            )
        if y0 != self._rows_in:
            raise InputError(f"bands must arrive in order: expected y0={self._rows_in}, got {y0}")
        if self._rows_in + band.shape[0] > self.height:
            raise InputError(f"band rows {y0}..{y0 + band.shape[0]} exceed height {self.height}")
        if self.dtype == np.uint8 and band.dtype != np.uint8:
            if band.dtype.kind not in "biu" or (band.size and (band.min() < 0 or band.max() > 255)):
                raise InputError(f"uint8 map: band of {band.dtype} has values outside 0..255")
        band = band.astype(self.dtype, copy=False)
        for start in range(0, band.shape[0], self.tile_size):  # bound temporaries
            rows = band[start : start + self.tile_size]
            self._rows_in += rows.shape[0]
            self._accept(0, rows)

    def close(self) -> None:
        """Finish the pyramid, write the reduced levels and rename the file into place.

        Raises:
            ValueError: fewer rows were written than the height (no file is left).
        """
        if self._closed:
            return
        try:
            if self._rows_in != self.height:
                raise InputError(
                    f"{self.path}: only {self._rows_in} of {self.height} rows were written"
                )
            for k in range(len(self.level_shapes)):
                self._flush_carry(k)
            if self._tile_row_fill:
                self._emit_tile_row(self._tile_row[: self._tile_row_fill])
            self._thread.join()
            if self._thread_error is not None:
                raise self._thread_error
            for spool in self._spools:
                spool.close()
            for k in range(1, len(self.level_shapes)):
                self._write_reduced_level(k)
            self._tiff.close()
        except BaseException as e:
            self.abort(e)
            raise
        self._closed = True
        self._spool_dir.cleanup()
        self._atomic.__exit__(None, None, None)

    def abort(self, error: BaseException | None = None) -> None:
        """Stop writing and delete the temporary files; the target path is not created."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Empty):
            while True:  # unblock the level-0 thread, then tell it to stop
                self._tile_rows.get_nowait()
        self._tile_rows.put(_ABORT)
        self._thread.join()
        with contextlib.suppress(Exception):
            self._tiff.close()
        for spool in self._spools:
            spool.close()
        self._spool_dir.cleanup()
        error = error or RuntimeError(f"{self.path}: write aborted")
        with contextlib.suppress(BaseException):
            self._atomic.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> TiffMapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()

    # ---- pyramid --------------------------------------------------------------------------

    def _accept(self, k: int, rows: np.ndarray) -> None:
        """Rows of level k arrive: store them, pass their 2 x 2 mean on to level k + 1."""
        if k == 0:
            self._add_level0_rows(rows)
        else:
            self._spools[k - 1].write(np.ascontiguousarray(rows).data)
        if k + 1 == len(self.level_shapes) or rows.shape[0] == 0:
            return
        if self._carry[k] is not None:
            rows = np.concatenate([self._carry[k], rows])
            self._carry[k] = None
        even = rows.shape[0] - rows.shape[0] % 2
        if even < rows.shape[0]:
            self._carry[k] = rows[even:].copy()
        if even:
            self._accept(k + 1, downsample_2x2(rows[:even]))

    def _flush_carry(self, k: int) -> None:
        """An odd last row of level k is averaged with itself into the last row of k + 1."""
        if self._carry[k] is not None:
            last = self._carry[k]
            self._carry[k] = None
            self._accept(k + 1, downsample_2x2(np.concatenate([last, last])))

    def _add_level0_rows(self, rows: np.ndarray) -> None:
        while rows.shape[0]:
            n = min(rows.shape[0], self.tile_size - self._tile_row_fill)
            self._tile_row[self._tile_row_fill : self._tile_row_fill + n] = rows[:n]
            self._tile_row_fill += n
            rows = rows[n:]
            if self._tile_row_fill == self.tile_size:
                self._emit_tile_row(self._tile_row)

    def _emit_tile_row(self, tile_row: np.ndarray) -> None:
        # whole rows of tiles cross to the level-0 thread: one hand-off per row, not per
        # tile, keeps the two threads from trading the GIL thousands of times
        item = tile_row.copy()
        while True:
            try:
                self._tile_rows.put(item, timeout=0.1)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    error = self._thread_error or RuntimeError("level-0 writer stopped")
                    raise error from None
        self._tile_row_fill = 0

    # ---- TIFF -----------------------------------------------------------------------------

    def _write_level0(self) -> None:
        try:
            self._write_page(0, self._queued_tiles())
        except BaseException as e:  # reported by close() / write_band()
            self._thread_error = e

    def _queued_tiles(self) -> Iterator[np.ndarray]:
        for _ in range(0, self.height, self.tile_size):
            tile_row = self._tile_rows.get()
            if tile_row is _ABORT:
                raise RuntimeError("aborted")
            for x0 in range(0, self.width, self.tile_size):
                yield tile_row[:, x0 : x0 + self.tile_size]

    def _write_reduced_level(self, k: int) -> None:
        h, w = self.level_shapes[k]
        c = (self.channels,) if self.channels == 3 else ()
        row_items = w * self.channels
        path = Path(self._spool_dir.name) / f"level{k}.raw"

        def tiles() -> Iterator[np.ndarray]:
            with open(path, "rb") as f:
                for y0 in range(0, h, self.tile_size):
                    n = min(self.tile_size, h - y0)
                    tile_row = np.fromfile(f, self.dtype, count=n * row_items)
                    if tile_row.size != n * row_items:
                        raise RuntimeError(f"level {k} spool is short")
                    tile_row = tile_row.reshape(n, w, *c)
                    for x0 in range(0, w, self.tile_size):
                        yield tile_row[:, x0 : x0 + self.tile_size]

        self._write_page(k, tiles())

    def _write_page(self, k: int, tiles: Iterator[np.ndarray]) -> None:
        h, w = self.level_shapes[k]
        shape = (h, w, 3) if self.channels == 3 else (h, w)
        kwargs = {}
        if self.mpp is not None:
            h0, w0 = self.level_shapes[0]
            pixels_per_cm = (1e4 / (self.mpp * w0 / w), 1e4 / (self.mpp * h0 / h))
            kwargs.update(resolution=pixels_per_cm, resolutionunit="CENTIMETER")
        if self._compression_level is not None:
            kwargs["compressionargs"] = {"level": self._compression_level}
        if k == 0:
            if self.ome:
                kwargs["subifds"] = len(self.level_shapes) - 1
                axes = "YXS" if self.channels == 3 else "YX"
                metadata = {"axes": axes}
                if self.mpp is not None:
                    metadata.update(PhysicalSizeX=self.mpp, PhysicalSizeY=self.mpp)
                kwargs["metadata"] = metadata
            else:
                kwargs.update(description=self._description, metadata=None)
        else:
            kwargs.update(subfiletype=1, metadata=None)
        self._tiff.write(
            tiles,
            shape=shape,
            dtype=self.dtype,
            tile=(self.tile_size, self.tile_size),
            compression=self._compression,
            photometric="rgb" if self.channels == 3 else "minisblack",
            software="sstream",
            **kwargs,
        )
