"""Every bad input gives one ImageReadError line naming the file and the cause."""

import struct

import numpy as np
import pytest
import tifffile
from conftest import rgb_image
from PIL import Image

from sstream.io import ImageReadError, open_image


def assert_clear_error(excinfo, path, cause: str):
    message = str(excinfo.value)
    assert str(path) in message
    assert cause.lower() in message.lower()
    assert "\n" not in message
    assert isinstance(excinfo.value, ValueError)


def patch_tag(path, name: str, value: int):
    """Overwrite an inline SHORT/LONG tag value of the first page in place."""
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[0].tags[name]
        offset, fmt, byteorder = tag.valueoffset, tag.dtype, tf.byteorder
    code = {3: "H", 4: "I", 16: "Q"}[int(fmt)]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(byteorder + code, value))


@pytest.mark.parametrize(
    "make, cause",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: p.write_text("image,label\na.tif,1\n"), "not a recognised image"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"II*\x00\xff\xff\xff\x7f"), "tiff"),
    ],
    ids=["missing", "directory", "text", "empty", "bad-ifd-offset"],
)
def test_open_errors(tmp_path, make, cause):
    path = tmp_path / "x.tif"
    make(path)
    with pytest.raises(ImageReadError) as excinfo:
        open_image(path)
    assert_clear_error(excinfo, path, cause)


def test_truncated_tiff(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, rgb_image(), tile=(64, 64), compression="zlib")
    data = path.read_bytes()
    # image data is written before the IFD; drop the IFD and some tiles -> structure error
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as excinfo:
        open_image(path)
    assert_clear_error(excinfo, path, "")
    # IFD first (as many writers do), then cut into the pixel data
    path2 = tmp_path / "t2.tif"
    with tifffile.TiffWriter(path2) as tw:
        tw.write(rgb_image(), tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path2) as tf:
        end = int(tf.pages[0].dataoffsets[-1])
        ifd = tf.pages[0].offset
    if ifd < end:  # only meaningful when pixel data follows the IFD
        path2.write_bytes(path2.read_bytes()[: end + 3])
        with pytest.raises(ImageReadError) as excinfo:
            open_image(path2)
        assert_clear_error(excinfo, path2, "truncated")


def test_truncated_pixel_data_detected_at_open(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, rgb_image(), tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[0].tags["TileByteCounts"]
        n = len(tag.value)
        offset, byteorder = tag.valueoffset, tf.byteorder
    with open(path, "r+b") as f:  # claim the last tile is larger than the file
        f.seek(offset + 4 * (n - 1))
        f.write(struct.pack(byteorder + "I", 10**8))
    with pytest.raises(ImageReadError) as excinfo:
        open_image(path)
    assert_clear_error(excinfo, path, "truncated")


def test_tile_that_fails_to_decode(tmp_path):
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, rgb_image(), tile=(64, 64), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[8], tf.pages[0].databytecounts[8]  # tile (1, 1)
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(range(256)) * (count // 256) + bytes(count % 256)
    path.write_bytes(bytes(data))
    with open_image(path) as slide:
        good = slide.read_region((0, 0), 0, (64, 64))  # tile (0, 0) is intact
        np.testing.assert_array_less(-1, good)
        with pytest.raises(ImageReadError) as excinfo:
            slide.read_region((70, 70), 0, (10, 10))
    assert_clear_error(excinfo, path, "cannot decode level 0")


def test_unsupported_compression(tmp_path):
    path = tmp_path / "u.tif"
    tifffile.imwrite(path, rgb_image(), tile=(64, 64), compression="zlib")
    patch_tag(path, "Compression", 60000)
    with pytest.raises(ImageReadError) as excinfo:
        open_image(path)
    assert_clear_error(excinfo, path, "compression")


def test_zero_sized_tiff(tmp_path):
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    patch_tag(path, "ImageWidth", 0)
    with pytest.raises(ImageReadError) as excinfo:
        open_image(path)
    assert_clear_error(excinfo, path, "zero-sized")


def test_truncated_png(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(rgb_image(0, 100, 100)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageReadError) as excinfo:
        open_image(path)
    assert_clear_error(excinfo, path, "truncated")
