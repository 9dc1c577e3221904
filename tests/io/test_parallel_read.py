"""Parallel decoding and read-ahead give the serial reader's pixels, within stated bounds.

- every layout and backend: regions read with 1, 3 and 7 decode threads are equal;
- the read-ahead serves announced regions in order, keeps at most `depth` of them, copes with
  skipped and unannounced regions, and hands a failed read's exception to the caller;
- a tile that fails to decode in a worker is the same one-line ImageReadError;
- Ctrl-C while waiting for a region read ahead stops cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from sstream.io import ImageReadError, open_image
from sstream.io.parallel import split_evenly
from sstream.io.prefetch import ReadAhead
from tests.io.conftest import H, W, rgb_image, write_layout

REGIONS = [(0, 0, W, H), (63, 65, 130, 129), (-20, 250, 100, 80), (400, 290, 30, 30),
           (1, 1, 1, 1)]


def regions_with(path, workers: int, backend: str = "auto") -> list[np.ndarray]:
    with open_image(path, backend=backend, read_workers=workers) as slide:
        return [slide.read_region((x, y), level, (w, h)) for level in range(slide.level_count)
                for x, y, w, h in REGIONS]


def test_every_layout_reads_the_same_pixels_with_any_number_of_threads(layout_file):
    path, _, _ = layout_file
    serial = regions_with(path, 1)
    for workers in (3, 7):
        for got, want in zip(regions_with(path, workers), serial, strict=True):
            np.testing.assert_array_equal(got, want)


def test_openslide_reads_in_bands_through_a_handle_per_thread(tmp_path, monkeypatch):
    pytest.importorskip("openslide")
    from sstream.io import reader

    path = tmp_path / "slide.svs"
    write_layout(path, "svs", rgb_image())
    monkeypatch.setattr(reader._OpenSlideLevel, "_MIN_BAND_PIXELS", 500)  # many bands
    serial = regions_with(path, 1, "openslide")
    parallel = regions_with(path, 4, "openslide")
    for got, want in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(got, want)
    with open_image(path, backend="openslide", read_workers=4) as slide:
        slide.read_region((0, 0), 0, (W, H))
        handles = slide._levels[0]._handles
        assert 1 < len(handles._all) <= 5  # the first handle, and at most one per worker
    assert len(handles._all) == 1  # the workers' handles are closed with the slide


def test_split_evenly_keeps_order_and_covers_everything():
    items = list(range(11))
    for parts in (1, 2, 3, 11, 40):
        runs = split_evenly(items, parts)
        assert [i for run in runs for i in run] == items and len(runs) <= parts
    assert split_evenly([], 4) == []


def test_a_tile_that_fails_in_a_worker_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "broken.tif"
    write_layout(path, "tiled-jpeg", rgb_image())
    with open_image(path) as slide:  # overwrite one tile's bytes with garbage
        tiles = slide._levels[0].tiles
        offset, count = int(tiles._offsets[5]), int(tiles._counts[5])
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = os.urandom(count)
    path.write_bytes(bytes(data))
    for workers in (1, 4):
        with open_image(path, read_workers=workers) as slide:
            with pytest.raises(ImageReadError) as caught:
                slide.read_region((0, 0), 0, (W, H))
            assert str(path) in str(caught.value) and "\n" not in str(caught.value)
            source_read = ReadAhead(lambda box, slide=slide: slide.read_region(*box))
            box = ((0, 0), 0, (W, H))
            source_read.expect([box])
            with pytest.raises(ImageReadError, match="cannot decode level 0"):
                source_read(box)
            source_read.close()


class SlowReads:
    """A read function that takes `delay` seconds and records how many run at once."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay, self.running, self.most, self.calls = delay, 0, 0, []
        self.lock = threading.Lock()

    def __call__(self, key):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(key)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        if key == "bad":
            raise ImageReadError("slide.tif", "cannot decode level 0 pixels")
        return f"pixels of {key}"


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_read_ahead_serves_in_order_within_its_memory_bound(depth):
    reads = SlowReads()
    with ReadAhead(reads, depth) as ahead:
        ahead.expect(range(12))
        held = []
        for key in range(12):
            held.append(ahead.held())
            assert ahead(key) == f"pixels of {key}"
            time.sleep(0.03)  # compute: the next regions read meanwhile
        assert max(held) <= depth and reads.most <= depth + 1  # + the one being taken
        assert ahead.hits == 12 and ahead.misses == 0
        assert sorted(reads.calls) == list(range(12))  # each region read once


def test_read_ahead_copes_with_skipped_and_unannounced_regions():
    reads = SlowReads(0.001)
    with ReadAhead(reads, 2) as ahead:
        ahead.expect([1, 2, 3, 4, 5, 6, 7])
        assert ahead(1) == "pixels of 1"
        assert ahead(5) == "pixels of 5"   # 2, 3 and 4 skipped
        assert ahead(99) == "pixels of 99"  # never announced: read on demand
        assert ahead(6) == "pixels of 6" and ahead(7) == "pixels of 7"
        assert ahead.held() == 0
        ahead.expect(["bad", 8])
        with pytest.raises(ImageReadError, match="cannot decode"):
            ahead("bad")  # the background read's exception, raised to the caller
        assert ahead(8) == "pixels of 8"


def test_ctrl_c_while_waiting_for_a_region_stops_cleanly():
    reads = SlowReads(0.5)
    ahead = ReadAhead(reads, 2)
    ahead.expect([1, 2, 3])
    main = threading.get_ident()
    timer = threading.Timer(0.1, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ahead(1)
        time.sleep(5)  # (not reached when the interrupt lands in the wait above)
    ahead.close()  # waits for the reads in flight, starts no more
    assert time.monotonic() - began < 2 and reads.running == 0
    started = len(reads.calls)
    time.sleep(0.6)
    assert len(reads.calls) == started and reads.running == 0


@pytest.mark.parametrize("photometric, channels", [("rgb", 3), ("ycbcr", 3),
                                                   ("minisblack", 1)])
def test_jpeg_tiles_decode_to_tifffiles_pixels(tmp_path, photometric, channels):
    """The parallel reader decodes JPEG tiles itself (imagecodecs, tifffile's arguments):
    its pixels are tifffile's own, bit for bit, in every colour layout."""
    import tifffile

    image = rgb_image()[..., :channels].squeeze()
    path = tmp_path / f"{photometric}.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="jpeg",
                     photometric=photometric, metadata=None)
    want = tifffile.imread(path).reshape(H, W, -1)
    with open_image(path, read_workers=3) as slide:
        assert slide._levels[0].tiles is not None  # the parallel reader, not tifffile's
        got = slide.read_region((0, 0), 0, (W, H))
    np.testing.assert_array_equal(got if channels == 3 else got[..., :1], want)
