"""Backends: tifffile and OpenSlide read the same files to the same pixels; the choice of
backend, and a format whose backend is missing."""

import sys

import numpy as np
import pytest
from conftest import rgb_image, write_layout
from PIL import Image

from sstream.io import ImageReadError, open_image, write_synthetic_slide

openslide = pytest.importorskip("openslide")

# layouts OpenSlide reads (it reads no SubIFDs, strips or JPEG 2000 in generic TIFFs)
BOTH = ["tiled-none", "tiled-zlib", "tiled-jpeg", "bigtiff", "reduced-pages", "svs"]
MAX_JPEG_GAP, MEAN_JPEG_GAP = 8, 1.0


def assert_same_slide(path, lossy: bool) -> None:
    """Same levels, mpp and regions (inside, across the edge, outside): equal pixels for
    lossless files (at levels with an integer downsample); for JPEG tiles, what two JPEG
    decoders (imagecodecs', OpenSlide's
    libjpeg-turbo) make of them, which differ in the last bits of chroma upsampling."""
    with open_image(path, "tifffile") as tiff, open_image(path, "openslide") as slide:
        assert (tiff.backend, slide.backend) == ("tifffile", "openslide")
        assert tiff.level_dimensions == slide.level_dimensions
        assert tiff.level_downsamples == pytest.approx(slide.level_downsamples)
        assert tiff.mpp == slide.mpp
        for level in range(tiff.level_count):
            width, height = tiff.level_dimensions[level]
            downsample = round(tiff.level_downsamples[level])
            if downsample != slide.level_downsamples[level]:
                continue  # OpenSlide paints such a level at a sub-pixel offset (reader doc)
            for x, y in ((0, 0), (width - 50, height - 30), (-7, 5)):  # inside, edge, outside
                location = (x * downsample, y * downsample)
                ours = tiff.read_region(location, level, (64, 48)).astype(int)
                theirs = slide.read_region(location, level, (64, 48)).astype(int)
                gap = np.abs(ours - theirs)
                assert gap.max() <= (MAX_JPEG_GAP if lossy else 0), (level, x, gap.max())
                assert gap.mean() <= (MEAN_JPEG_GAP if lossy else 0), (level, x, gap.mean())


@pytest.mark.parametrize("layout", BOTH)
def test_tifffile_and_openslide_read_the_same_pixels(tmp_path, layout):
    path = tmp_path / f"slide.{'svs' if layout == 'svs' else 'tif'}"
    write_layout(path, layout, rgb_image())
    assert_same_slide(path, lossy="jpeg" in layout or layout in ("reduced-pages", "svs"))


def test_a_synthetic_jpeg_pyramid_and_its_associated_images(tmp_path):
    write_synthetic_slide(tmp_path / "s.tif", 700, 1, seed=3, tile=128)
    assert_same_slide(tmp_path / "s.tif", lossy=True)
    path = tmp_path / "slide.svs"
    write_layout(path, "svs", rgb_image())
    with open_image(path, "tifffile") as tiff, open_image(path, "openslide") as slide:
        assert (tiff.vendor, slide.vendor) == ("svs", "aperio")
        assert sorted(tiff.associated) == sorted(slide.associated) == \
            ["label", "macro", "thumbnail"]
        for name in tiff.associated:
            assert np.array_equal(tiff.associated_image(name), slide.associated_image(name))
        with pytest.raises(ValueError, match="no associated image 'overview'"):
            tiff.associated_image("overview")


def test_auto_picks_tifffile_for_tiffs_pillow_for_pngs_and_honours_the_setting(tmp_path,
                                                                               monkeypatch):
    write_layout(tmp_path / "a.tif", "reduced-pages", rgb_image())
    Image.fromarray(rgb_image()).save(tmp_path / "b.png")
    with open_image(tmp_path / "a.tif") as tiff, open_image(tmp_path / "b.png") as png:
        assert (tiff.backend, png.backend) == ("tifffile", "pillow")
    monkeypatch.setenv("SSTREAM_BACKEND", "openslide")  # what `sstream --backend` sets
    with open_image(tmp_path / "a.tif") as slide:
        assert slide.backend == "openslide"
    with pytest.raises(ImageReadError, match="not a format OpenSlide reads"):
        open_image(tmp_path / "b.png")
    with pytest.raises(ImageReadError, match="tifffile reads TIFF files only"):
        open_image(tmp_path / "b.png", "tifffile")
    with pytest.raises(ValueError, match="unknown backend 'libvips'"):
        open_image(tmp_path / "a.tif", "libvips")


def test_a_format_whose_backend_is_missing_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "slide.mrxs").write_text("[GENERAL]\n")
    with pytest.raises(ImageReadError, match="OpenSlide does not recognise this .mrxs"):
        open_image(tmp_path / "slide.mrxs")
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if not installed
    for backend in ("auto", "openslide"):
        with pytest.raises(ImageReadError, match=r"needs OpenSlide: pip install "
                                                 r"'sstream\[openslide\]'"):
            open_image(tmp_path / "slide.mrxs", backend)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ImageReadError, match="no .dcm files"):
        open_image(tmp_path / "folder")


def test_a_dicom_series_reads_as_the_tiff_it_was_made_from(tmp_path):
    """A lossless TIFF pyramid, made a DICOM WSI series (uncompressed frames) by
    wsidicomizer, opened by its folder or any of its files: the same levels, mpp and
    pixels as the TIFF."""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    from wsidicom.codec import NumpySettings

    image = rgb_image(seed=4, height=600, width=500)
    levels = [image, image[::2, ::2], image[::4, ::4]]
    source = tmp_path / "lossless.tif"
    import tifffile

    with tifffile.TiffWriter(source) as writer:
        for index, level in enumerate(levels):
            writer.write(np.ascontiguousarray(level), tile=(128, 128), compression="zlib",
                         photometric="rgb", subfiletype=1 if index else 0, metadata=None,
                         resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    series = tmp_path / "dicom"
    series.mkdir()
    files = wsidicomizer.WsiDicomizer.convert(source, series, workers=1, tile_size=128,
                                              encoding=NumpySettings())
    for path in (series, files[-1]):
        with open_image(source) as tiff, open_image(path) as dicom:
            assert (dicom.backend, dicom.vendor) == ("openslide", "dicom")
            assert dicom.level_dimensions == tiff.level_dimensions
            assert dicom.mpp == tiff.mpp == pytest.approx(0.25)
            for level in range(3):
                for location in ((40, 24), (380, 460), (-9, 5)):
                    assert np.array_equal(dicom.read_region(location, level, (100, 80)),
                                          tiff.read_region(location, level, (100, 80)))
