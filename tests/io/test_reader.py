"""SlideImage: region reads equal the same region of the fully loaded image, everywhere."""

import math
import threading

import numpy as np
import pytest
import tifffile
from conftest import H, W, halve, rgb_image
from PIL import Image

from sstream.io import ImageReadError, SlideImage, open_image, to_rgb8


def expected_region(full: np.ndarray, level_xy, size, fill=255) -> np.ndarray:
    """Crop (x, y, w, h) out of a fully loaded level, padding outside with `fill`."""
    (x, y), (w, h) = level_xy, size
    out = np.full((h, w, 3), fill, np.uint8)
    fh, fw = full.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, fw), min(y + h, fh)
    if x0 < x1 and y0 < y1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = full[y0:y1, x0:x1]
    return out


# (x, y, w, h) in level pixels: inside, crossing each border, around a corner, outside
REGIONS = [
    (5, 7, 50, 40),
    (-10, 3, 40, 40),
    (3, -9, 40, 40),
    ("right", 10, 70, 30),
    (10, "bottom", 30, 70),
    ("right", "bottom", 90, 90),
    (-5, -5, 1000, 1000),
    (2000, 2000, 10, 10),
    (0, 0, 1, 1),
]


def test_every_layout_and_level_matches_full_decode(layout_file):
    path, layout, levels = layout_file
    with open_image(path) as slide:
        assert slide.dimensions == (W, H)
        assert slide.level_count == len(levels)
        expected_dims = [(lv.shape[1], lv.shape[0]) for lv in levels]
        assert list(slide.level_dimensions) == expected_dims
        for level, full in enumerate(levels):
            lw, lh = slide.level_dimensions[level]
            ds_x, ds_y = W / lw, H / lh
            for x, y, w, h in REGIONS:
                x = lw - w // 2 if x == "right" else x
                y = lh - h // 2 if y == "bottom" else y
                location = (math.ceil(x * ds_x), math.ceil(y * ds_y))  # maps back to (x, y)
                for fill in (255, 0):
                    got = slide.read_region(location, level, (w, h), fill=fill)
                    want = expected_region(full, (x, y), (w, h), fill)
                    assert got.dtype == np.uint8 and got.shape == (h, w, 3)
                    np.testing.assert_array_equal(got, want, err_msg=f"{layout} L{level}")


def test_lossless_layouts_equal_the_source_image(tmp_path):
    from conftest import write_layout

    image = rgb_image(3)
    for layout in [
        "tiled-none",
        "tiled-zlib",
        "tiled-lzw",
        "tiled-zstd",
        "striped",
        "bigtiff",
        "subifds",
        "ome",
    ]:
        path = tmp_path / f"{layout}.tif"
        write_layout(path, layout, image)
        with open_image(path) as slide:
            np.testing.assert_array_equal(slide.read_level(0), image, err_msg=layout)
            if slide.level_count > 1:
                np.testing.assert_array_equal(slide.read_level(1), halve(image))


def test_pyramid_metadata_svs(tmp_path):
    from conftest import write_layout

    path = tmp_path / "slide.svs"
    write_layout(path, "svs", rgb_image())
    with open_image(path) as slide:
        assert slide.level_count == 3  # thumbnail, label and macro are not levels
        assert slide.level_dimensions == ((W, H), (205, 150), (103, 75))
        assert slide.level_downsamples[1] == pytest.approx(2.0)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.level_mpp(2) == pytest.approx(0.499 * slide.level_downsamples[2])


def test_mpp_from_ome_and_resolution_tags(tmp_path):
    from conftest import write_layout

    write_layout(tmp_path / "o.ome.tif", "ome", rgb_image())
    with open_image(tmp_path / "o.ome.tif") as slide:
        assert slide.mpp == pytest.approx(0.25)
    image = rgb_image()
    tifffile.imwrite(
        tmp_path / "cm.tif", image, resolution=(40000, 20000), resolutionunit="CENTIMETER"
    )
    with open_image(tmp_path / "cm.tif") as slide:
        assert (slide.mpp_x, slide.mpp_y) == pytest.approx((0.25, 0.5))
    tifffile.imwrite(tmp_path / "inch.tif", image, resolution=(50800, 50800), resolutionunit="INCH")
    with open_image(tmp_path / "inch.tif") as slide:
        assert slide.mpp == pytest.approx(0.5)
    tifffile.imwrite(tmp_path / "none.tif", image)
    with open_image(tmp_path / "none.tif") as slide:
        assert slide.mpp is None
        with pytest.raises(ImageReadError, match="mpp"):
            slide.level_for_mpp(1.0)


def test_level_choice(tmp_path):
    from conftest import write_layout

    write_layout(tmp_path / "s.svs", "svs", rgb_image())  # downsamples 1, 2, ~3.99; mpp 0.499
    with open_image(tmp_path / "s.svs") as slide:
        assert [slide.get_best_level_for_downsample(d) for d in (0.5, 1, 1.9, 2, 3.9, 4, 64)] == [
            0,
            0,
            0,
            1,
            1,
            2,
            2,
        ]
        assert slide.level_for_mpp(0.3) == 0  # finer than level 0
        assert slide.level_for_mpp(0.5) == 0  # never coarser than asked
        assert slide.level_for_mpp(1.0) == 1
        assert slide.level_for_mpp(2.0) == 2
        with pytest.raises(ValueError):
            slide.level_for_mpp(0)


def test_read_region_validates_arguments(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", rgb_image())
    with open_image(tmp_path / "a.tif") as slide:
        with pytest.raises(ValueError, match="level"):
            slide.read_region((0, 0), 1, (4, 4))
        with pytest.raises(ValueError, match="size"):
            slide.read_region((0, 0), 0, (-1, 4))
        assert slide.read_region((0, 0), 0, (0, 5)).shape == (5, 0, 3)
    with pytest.raises(ValueError, match="closed"):
        slide.read_region((0, 0), 0, (4, 4))


# ---- conversion rules -------------------------------------------------------------------


def gray3(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=-1)


def over_white(rgb, alpha):
    rgb, a = rgb.astype(np.int64), alpha.astype(np.int64)[..., None]
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def read_all(path) -> np.ndarray:
    with open_image(path) as slide:
        return slide.read_level(0)


def test_conversions_to_rgb8(tmp_path):
    rng = np.random.default_rng(1)
    g8 = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (40, 50, 3), dtype=np.uint16)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    f01 = rng.random((40, 50)).astype(np.float32)
    f255 = (rng.random((40, 50)) * 300 - 20).astype(np.float32)
    i16 = rng.integers(-1000, 32768, (40, 50), dtype=np.int16)
    cases = {
        "gray8": (dict(data=g8, tile=(16, 16)), gray3(g8)),
        "gray16": (dict(data=g16), gray3((g16 >> 8).astype(np.uint8))),
        "rgb16": (dict(data=rgb16, photometric="rgb"), (rgb16 >> 8).astype(np.uint8)),
        "rgba": (
            dict(data=rgba, photometric="rgb", extrasamples=["unassalpha"]),
            over_white(rgba[..., :3], rgba[..., 3]),
        ),
        "float01": (dict(data=f01), gray3(np.rint(f01 * 255).astype(np.uint8))),
        "float255": (dict(data=f255), gray3(np.rint(np.clip(f255, 0, 255)).astype(np.uint8))),
        "int16": (
            dict(data=i16),
            gray3((np.clip(i16, 0, None).astype(np.int64) * 255 // 32767).astype(np.uint8)),
        ),
        "miniswhite": (dict(data=g8, photometric="miniswhite"), gray3(255 - g8)),
        "planar": (
            dict(
                data=np.moveaxis(rgb_image(0, 40, 50), -1, 0),
                photometric="rgb",
                planarconfig="separate",
            ),
            rgb_image(0, 40, 50),
        ),
    }
    for name, (kwargs, want) in cases.items():
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, **kwargs)
        np.testing.assert_array_equal(read_all(path), want, err_msg=name)


def test_palette_and_stack(tmp_path):
    idx = np.arange(40 * 50).reshape(40, 50).astype(np.uint8) % 4
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = [[0, 65535, 0, 32768], [0, 0, 65535, 32768], [65535, 0, 0, 32768]]
    tifffile.imwrite(tmp_path / "pal.tif", idx, photometric="palette", colormap=cmap)
    lut = (cmap >> 8).T.astype(np.uint8)
    np.testing.assert_array_equal(read_all(tmp_path / "pal.tif"), lut[idx])
    stack = np.stack([rgb_image(i, 40, 50) for i in range(3)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="rgb")
    np.testing.assert_array_equal(read_all(tmp_path / "stack.tif"), stack[0])  # first plane


def test_to_rgb8_rules_directly():
    np.testing.assert_array_equal(to_rgb8(np.array([[True, False]]))[0, :, 0], [255, 0])
    f = np.array([[np.nan, -1, 0.5, 2]], np.float32)
    np.testing.assert_array_equal(to_rgb8(f)[0, :, 0], [0, 0, 128, 255])
    np.testing.assert_array_equal(to_rgb8(f, float_scale=1.0)[0, :, 0], [0, 0, 0, 2])
    five = np.arange(5, dtype=np.uint8).reshape(1, 1, 5)
    np.testing.assert_array_equal(to_rgb8(five)[0, 0], [0, 1, 2])  # >4 channels: first 3


# ---- Pillow formats -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16"])
def test_png_modes(tmp_path, mode):
    rgba = np.concatenate([rgb_image(0, 60, 70), np.full((60, 70, 1), 128, np.uint8)], -1)
    rgba[:10, :, 3] = 0
    if mode == "I;16":
        arr = (np.arange(60 * 70).reshape(60, 70) * 15).astype(np.uint16)
        im = Image.fromarray(arr)
        want = gray3((arr >> 8).astype(np.uint8))
    else:
        im = Image.fromarray(rgba, "RGBA").convert(mode)
        want = None
    path = tmp_path / "a.png"
    im.save(path)
    if want is None:
        decoded = Image.open(path)
        arr = np.asarray(decoded.convert("RGBA"))
        want = over_white(arr[..., :3], arr[..., 3])
    with open_image(path) as slide:
        assert slide.level_count == 1 and slide.dimensions == (70, 60) and slide.mpp is None
        np.testing.assert_array_equal(slide.read_level(0), want)
        np.testing.assert_array_equal(
            slide.read_region((60, -5), 0, (20, 20)), expected_region(want, (60, -5), (20, 20))
        )


def test_jpeg_via_pillow(tmp_path):
    Image.fromarray(rgb_image(0, 64, 80)).save(tmp_path / "a.jpg", quality=90)
    want = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    np.testing.assert_array_equal(read_all(tmp_path / "a.jpg"), want)


def test_pillow_pixel_limit_is_raised_deliberately(tmp_path, monkeypatch):
    import sstream.io.reader as reader

    Image.fromarray(rgb_image(0, 64, 80)).save(tmp_path / "a.png")
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(reader, "PIL_MAX_PIXELS", 64 * 80 - 1)
    with pytest.raises(ImageReadError, match="PIL_MAX_PIXELS"):
        open_image(tmp_path / "a.png")
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global is restored


def test_threaded_reads_match(tmp_path):
    from conftest import write_layout

    path = tmp_path / "p.tif"
    write_layout(path, "subifds", rgb_image())
    with open_image(path) as slide:
        full = slide.read_level(0)
        errors = []

        def worker(seed):
            rng = np.random.default_rng(seed)
            for _ in range(30):
                x, y = rng.integers(0, W - 32), rng.integers(0, H - 32)
                got = slide.read_region((x, y), 0, (32, 32))
                if not np.array_equal(got, full[y : y + 32, x : x + 32]):
                    errors.append((x, y))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    assert isinstance(slide, SlideImage)


def _write_pyramid(path, levels, layout: str, metadata: bool) -> None:
    """Level 0 then its reduced copies: as SubIFDs of the first page, or as top-level pages
    marked reduced (NewSubfileType 1); with tifffile's JSON metadata or without any."""
    options = dict(tile=(32, 32), photometric="rgb", metadata={} if metadata else None)
    with tifffile.TiffWriter(path) as writer:
        writer.write(levels[0], subifds=len(levels) - 1 if layout == "subifd" else None,
                     **options)
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)


@pytest.mark.parametrize("step", [2, 4, 8])
@pytest.mark.parametrize("layout", ["subifd", "top-level"])
@pytest.mark.parametrize("metadata", [True, False])
def test_every_reduced_level_is_read_whatever_its_step_and_layout(tmp_path, step, layout,
                                                                  metadata):
    """Pyramids of 2x, 4x and 8x steps, in SubIFDs or top-level reduced pages, with or
    without the writer's metadata: every level opens, with its size, and reads the pixels
    written (tifffile alone lists an 8x level as a second series)."""
    rng = np.random.default_rng(step)
    levels = [rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)]
    while levels[-1].shape[0] // step >= 16:
        levels.append(np.ascontiguousarray(levels[-1][::step, ::step]))
    path = tmp_path / "pyramid.tif"
    _write_pyramid(path, levels, layout, metadata)
    with open_image(path) as slide:
        assert slide.level_count == len(levels) >= 3
        assert slide.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in levels)
        for index, expected in enumerate(levels):
            assert slide.level_downsamples[index] == pytest.approx(step ** index, rel=0.02)
            assert np.array_equal(slide.read_level(index), expected)
            lx, ly = (expected.shape[1] - 9) // 2, (expected.shape[0] - 7) // 2
            region = slide.read_region((lx * step ** index, ly * step ** index), index, (9, 7))
            assert np.array_equal(region, expected[ly:ly + 7, lx:lx + 9])


def test_images_that_are_not_levels_stay_out_of_the_pyramid(tmp_path):
    """A reduced image of another aspect ratio (a label) or dtype is not a level."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (512, 384, 3), dtype=np.uint8)
    path = tmp_path / "with_label.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(base, tile=(32, 32), photometric="rgb", metadata=None)
        writer.write(base[::8, ::8], tile=(16, 16), photometric="rgb", subfiletype=1,
                     metadata=None)
        writer.write(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8), photometric="rgb",
                     subfiletype=1, metadata=None)  # a label: another aspect ratio
        writer.write(base[::16, ::16, 0].astype(np.uint16), subfiletype=1, metadata=None)
    with open_image(path) as slide:
        assert slide.level_dimensions == ((384, 512), (48, 64))
