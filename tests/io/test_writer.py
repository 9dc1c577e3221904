"""TiffMapWriter: streamed bands in, a viewer-ready tiled pyramidal BigTIFF out."""

import json

import numpy as np
import pytest
import tifffile
import zarr

from sstream.io import TiffMapWriter, open_image, pyramid_shapes


def reference_pyramid(level0: np.ndarray, count: int) -> list[np.ndarray]:
    """Independent statement of the documented rule: 2 x 2 mean of what exists, per level."""
    levels = [level0]
    for _ in range(count - 1):
        a = levels[-1].astype(np.float64)
        h, w = a.shape[:2]
        a = np.pad(a, [(0, h % 2), (0, w % 2)] + [(0, 0)] * (a.ndim - 2), mode="edge")
        mean = (a[0::2, 0::2] + a[0::2, 1::2] + a[1::2, 0::2] + a[1::2, 1::2]) / 4
        if level0.dtype == np.uint8:
            mean = np.floor(mean + 0.5).astype(np.uint8)  # round half up
        levels.append(mean.astype(level0.dtype))
    return levels


def write_in_bands(path, image, band_heights, **kwargs):
    with TiffMapWriter(path, image.shape, image.dtype, **kwargs) as writer:
        y0 = 0
        for bh in band_heights:
            writer.write_band(y0, image[y0 : y0 + bh])
            y0 += bh
        if y0 < image.shape[0]:
            writer.write_band(y0, image[y0:])


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_round_trip_levels(tmp_path, dtype):
    rng = np.random.default_rng(0)
    image = (rng.random((333, 517)) * 255).astype(dtype)
    path = tmp_path / "map.tif"
    write_in_bands(path, image, [1, 7, 100, 64, 3], tile_size=64, mpp=0.5)
    with tifffile.TiffFile(path) as tf:
        pages = list(tf.pages)
        assert tf.is_bigtiff
        assert [p.shape for p in pages] == pyramid_shapes(333, 517, 64)
        assert [int(p.subfiletype) for p in pages] == [0] + [1] * (len(pages) - 1)
        assert all(p.is_tiled and p.tilewidth == 64 and p.compression == 32946 for p in pages)
        assert max(pages[-1].shape) <= 64  # pyramid ends when one tile holds the level
        got = [p.asarray() for p in pages]
    want = reference_pyramid(image, len(got))
    np.testing.assert_array_equal(got[0], image)
    for level, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == dtype
        if dtype == np.uint8:
            np.testing.assert_array_equal(g, w, err_msg=f"level {level}")
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-4, err_msg=f"level {level}")


def test_lazy_read_back_with_tifffile_zarr_and_slide_reader(tmp_path):
    image = np.arange(300 * 400, dtype=np.float32).reshape(300, 400) / (300 * 400)
    path = tmp_path / "map.tif"
    description = json.dumps({"scale": 32})
    write_in_bands(path, image, [37] * 8, tile_size=128, mpp=0.25, description=description)
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        assert len(series.levels) == 3  # top-level reduced pages are found as levels
        assert tf.pages[0].description == description
        z0 = zarr.open(series.aszarr(level=0), mode="r")
        np.testing.assert_array_equal(z0[100:200, 250:400], image[100:200, 250:400])
        z1 = zarr.open(series.aszarr(level=1), mode="r")
        assert z1.shape == (150, 200)
        assert tf.pages[0].tags["ResolutionUnit"].value == 3  # centimetre
    with open_image(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_mpp(1) == pytest.approx(0.5)
        np.testing.assert_array_equal(
            slide.read_region((10, 20), 0, (5, 5))[..., 0],
            np.rint(image[20:25, 10:15] * 255).astype(np.uint8),
        )


def test_lzw_512_tiles_and_explicit_levels(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (600, 700), dtype=np.uint8)
    path = tmp_path / "m.tif"
    write_in_bands(path, image, [600], tile_size=512, compression="lzw", levels=2)
    with tifffile.TiffFile(path) as tf:
        assert [p.compression for p in tf.pages] == [5, 5]
        assert tf.pages[0].tilewidth == 512
        np.testing.assert_array_equal(tf.pages[0].asarray(), image)


def test_ome_pyramid(tmp_path):
    image = np.random.default_rng(2).random((300, 260)).astype(np.float32)
    path = tmp_path / "m.ome.tif"
    write_in_bands(path, image, [100] * 3, tile_size=64, mpp=0.5, ome=True)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        assert len(tf.pages) == 1  # reduced levels are SubIFDs
        assert len(tf.series[0].levels) == 4
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), image)
    with open_image(path) as slide:
        assert slide.level_count == 4 and slide.mpp == pytest.approx(0.5)


def test_rgb_jpeg_writer(tmp_path):
    from conftest import rgb_image

    image = rgb_image(0, 200, 300)
    path = tmp_path / "rgb.tif"
    write_in_bands(path, image, [50] * 4, tile_size=64, compression="jpeg", compression_level=95)
    reference = tmp_path / "reference.tif"  # the same tiles encoded in one go by tifffile
    tifffile.imwrite(
        reference,
        image,
        tile=(64, 64),
        compression="jpeg",
        compressionargs={"level": 95},
        photometric="rgb",
    )
    with open_image(path) as slide:
        got = slide.read_level(0)
        np.testing.assert_array_equal(got, tifffile.imread(reference))
        assert np.abs(got.astype(int) - image).mean() < 6  # noisy content, 4:2:0 chroma
        assert slide.level_dimensions == ((300, 200), (150, 100), (75, 50), (38, 25))


def test_bad_use_leaves_no_file(tmp_path):
    path = tmp_path / "m.tif"
    image = np.zeros((100, 80), np.float32)
    with pytest.raises(ValueError, match="order"):
        with TiffMapWriter(path, image.shape, tile_size=64) as writer:
            writer.write_band(0, image[:10])
            writer.write_band(20, image[20:30])
    with pytest.raises(ValueError, match="rows were written"):
        with TiffMapWriter(path, image.shape, tile_size=64) as writer:
            writer.write_band(0, image[:50])
    with pytest.raises(ValueError, match="shape"):
        with TiffMapWriter(path, image.shape, tile_size=64) as writer:
            writer.write_band(0, image[:10, :40])
    with pytest.raises(ValueError, match="outside 0..255"):
        with TiffMapWriter(path, image.shape, np.uint8, tile_size=64) as writer:
            writer.write_band(0, np.full((10, 80), 300))
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file, no spool


def test_interrupted_write_leaves_no_file(tmp_path):
    path = tmp_path / "m.tif"
    image = np.ones((200, 200), np.float32)
    with pytest.raises(KeyboardInterrupt):
        with TiffMapWriter(path, image.shape, tile_size=64) as writer:
            writer.write_band(0, image[:150])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.tif"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        TiffMapWriter(path, (10, 10))
    assert path.read_bytes() == b"precious"
    with TiffMapWriter(path, (10, 10), overwrite=True) as writer:
        writer.write_band(0, np.zeros((10, 10), np.float32))
    assert tifffile.imread(path).shape == (10, 10)


def test_argument_checks(tmp_path):
    for kwargs in [
        dict(shape=(0, 5)),
        dict(shape=(5, 5), dtype=np.int16),
        dict(shape=(5, 5), tile_size=100),
        dict(shape=(5, 5), compression="lzma"),
        dict(shape=(5, 5), compression="jpeg"),
        dict(shape=(5, 5, 3), dtype=np.float32),
    ]:
        with pytest.raises(ValueError):
            TiffMapWriter(tmp_path / "x.tif", **kwargs)
    assert list(tmp_path.iterdir()) == []
