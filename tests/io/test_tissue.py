"""Tissue masks: detection on synthetic slides, masks from files, the clean-up's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageDraw
from scipy import ndimage

from sstream.io import ImageReadError, open_image
from sstream.io.tissue import (
    TissueMask,
    detect_tissue,
    fill_holes,
    read_tissue_mask,
    remove_small_components,
    tissue_preview,
)

EIGHT = np.ones((3, 3), bool)  # 8-connectivity for scipy


@settings(max_examples=60)
@given(mask=arrays(bool, st.tuples(st.integers(1, 30), st.integers(1, 30))),
       limit=st.integers(1, 12))
def test_clean_up_equals_scipy_on_random_masks(mask, limit):
    labels, count = ndimage.label(mask, structure=EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    want = mask & (sizes[labels] >= limit)
    assert np.array_equal(remove_small_components(mask, limit), want)

    background, count = ndimage.label(~mask, structure=EIGHT)
    sizes = np.bincount(background.ravel(), minlength=count + 1)
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0],
                                       background[:, -1]]))
    hole = (background > 0) & (sizes[background] < limit) & ~np.isin(background, border)
    assert np.array_equal(fill_holes(mask, limit), mask | hole)


# ---- synthetic slides --------------------------------------------------------------------

MPP = 2.0  # µm per pixel of the test slides: 3 x 3 mm in 1536 px, a 384 px mask


def paint_slide(glass=(242, 240, 244), tissue_everywhere=False, pen=True, dust=True,
                seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB slide, tissue truth, ink truth) with H&E-like tissue islands on glass, pen
    strokes (blue, green, black) and dust specks on the glass."""
    rng = np.random.default_rng(seed)
    size = 1536
    truth = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(truth)
    if tissue_everywhere:
        draw.rectangle([0, 0, size, size], fill=255)
    else:
        for x, y, rx, ry in [(400, 420, 260, 180), (1050, 500, 200, 300), (700, 1150, 330, 170)]:
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
        draw.ellipse([700 - 100, 1150 - 80, 700 + 100, 1150 + 80], fill=0)  # 0.1 mm² lumen
    tissue = np.asarray(truth) > 0
    noise = rng.normal(0, 12, (size, size, 1))
    eosin = np.array([228, 156, 190]) + noise
    nuclei = rng.random((size, size)) < 0.08
    stained = np.where(nuclei[..., None], np.array([105, 48, 138]) + noise, eosin)
    glass_rgb = np.array(glass) + rng.normal(0, 3, (size, size, 1))
    image = np.where(tissue[..., None], stained, glass_rgb)
    ink = Image.new("L", (size, size), 0)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if pen:
        for colour, points in [((40, 70, 180), [(80, 1400), (1450, 1350)]),     # blue
                               ((40, 140, 70), [(1400, 80), (1450, 1000)]),     # green
                               ((25, 25, 30), [(150, 80), (1300, 60)])]:       # black
            for layer in (ImageDraw.Draw(canvas), ImageDraw.Draw(ink)):
                layer.line(points, fill=colour if layer.im.mode == "RGB" else 255, width=60)
    if dust:
        painter = ImageDraw.Draw(canvas)
        for _ in range(40):  # 10-40 µm specks, grey to brown
            x, y = rng.integers(0, size, 2)
            radius = rng.integers(3, 10)
            if not tissue[min(y, size - 1), min(x, size - 1)]:
                painter.ellipse([x - radius, y - radius, x + radius, y + radius],
                                fill=tuple(int(v) for v in rng.integers(40, 120, 3)))
    return np.asarray(canvas), tissue, np.asarray(ink) > 0


def write_slide(path, rgb: np.ndarray) -> None:
    """A tiled pyramidal TIFF with 2 and 4x reduced levels, at MPP µm per pixel."""
    resolution = (1e4 / MPP, 1e4 / MPP)  # pixels per centimetre
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), photometric="rgb", subifds=2,
                  resolution=resolution, resolutionunit="CENTIMETER")
        for factor in (2, 4):
            tif.write(rgb[::factor, ::factor], tile=(256, 256), photometric="rgb",
                      subfiletype=1)


def iou(mask: TissueMask, truth: np.ndarray) -> float:
    """Intersection over union of a detected mask and the full-resolution truth (sampled
    at the mask's pixel centres)."""
    height, width = mask.mask.shape
    ys = ((np.arange(height) + 0.5) * mask.scale[1]).astype(int)
    xs = ((np.arange(width) + 0.5) * mask.scale[0]).astype(int)
    want = truth[np.ix_(ys, xs)]
    return float((mask.mask & want).sum() / max(1, (mask.mask | want).sum()))


@pytest.mark.parametrize("glass", [(242, 240, 244), (214, 214, 219), (236, 228, 240)],
                         ids=["white", "grey", "tinted"])
def test_auto_finds_tissue_on_glass_and_leaves_pen_and_dust_out(tmp_path, glass):
    rgb, truth, ink = paint_slide(glass=glass)
    write_slide(tmp_path / "slide.tif", rgb)
    with open_image(tmp_path / "slide.tif") as slide:
        found = detect_tissue(slide)
    assert found.source == "auto" and found.scale == pytest.approx((4.0, 4.0))  # 8 µm px
    assert iou(found, truth) > 0.93
    height, width = found.mask.shape
    ys = ((np.arange(height) + 0.5) * found.scale[1]).astype(int)
    xs = ((np.arange(width) + 0.5) * found.scale[0]).astype(int)
    on_ink = ink[np.ix_(ys, xs)] & ~truth[np.ix_(ys, xs)]
    assert not (found.mask & on_ink).any(), "pen strokes on glass count as tissue"
    hole = found.sample(np.array([700.0]), np.array([1150.0]))
    assert not hole[0], "a lumen as large as this is not filled"


def test_a_slide_that_is_all_tissue_is_all_tissue(tmp_path):
    rgb, _, _ = paint_slide(tissue_everywhere=True, pen=False, dust=False)
    write_slide(tmp_path / "slide.tif", rgb)
    with open_image(tmp_path / "slide.tif") as slide:
        assert detect_tissue(slide).fraction > 0.98


def test_empty_glass_has_no_tissue(tmp_path):
    rgb = np.clip(np.random.default_rng(1).normal(238, 4, (512, 512, 3)), 0, 255)
    write_slide(tmp_path / "slide.tif", rgb.astype(np.uint8))
    with open_image(tmp_path / "slide.tif") as slide:
        assert detect_tissue(slide).fraction == 0.0


# ---- masks from files ---------------------------------------------------------------------


@pytest.fixture()
def slide(tmp_path):
    write_slide(tmp_path / "slide.tif", paint_slide(pen=False, dust=False)[0])
    with open_image(tmp_path / "slide.tif") as image:
        yield image


def test_a_mask_file_of_any_size_covers_the_slide(tmp_path, slide):
    """A 300 x 300 PNG of label values (1 = tissue) for the 1536 px slide: tissue in its
    left half only; level-0 points sample it by proportion."""
    labels = np.zeros((300, 300), np.uint8)
    labels[:, :150] = 1
    Image.fromarray(labels).save(tmp_path / "mask.png")
    mask = read_tissue_mask(tmp_path / "mask.png", slide)
    assert mask.scale == pytest.approx((1536 / 300, 1536 / 300))
    assert mask.sample(np.array([10.0, 760.0, 780.0]), np.array([5.0, 1500.0, 5.0])).tolist() \
        == [True, True, False]
    assert mask.fraction == pytest.approx(0.5)


def test_a_large_label_mask_is_reduced_without_losing_thin_tissue(tmp_path, slide,
                                                                  monkeypatch):
    import sstream.io.tissue as tissue

    monkeypatch.setattr(tissue, "MAX_DETECTION_SIDE", 256)
    labels = np.zeros((1536, 1536), np.uint8)
    labels[100, :] = 1  # one row of label 1: averaging would round it away
    Image.fromarray(labels).save(tmp_path / "mask.png")
    mask = read_tissue_mask(tmp_path / "mask.png", slide)
    assert mask.mask.shape == (256, 256) and mask.mask[100 // 6].all()
    assert mask.mask.sum() == 256


@pytest.mark.parametrize("size, message", [
    ((300, 150), "aspect ratios differ"),
    ((100, 100), "selects no tissue"),
])
def test_masks_that_do_not_fit_are_refused_in_one_line(tmp_path, slide, size, message):
    Image.fromarray(np.zeros(size[::-1], np.uint8) + (size[0] != size[1])).save(
        tmp_path / "mask.png")
    with pytest.raises(ImageReadError, match=message) as error:
        read_tissue_mask(tmp_path / "mask.png", slide)
    assert "\n" not in str(error.value) and "mask.png" in str(error.value)


def test_a_file_that_is_not_an_image_is_refused(tmp_path, slide):
    (tmp_path / "mask.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="mask.png"):
        read_tissue_mask(tmp_path / "mask.png", slide)


def test_the_preview_dims_glass_and_keeps_tissue(slide):
    mask = detect_tissue(slide)
    preview = np.asarray(tissue_preview(slide, mask, max_side=512)).astype(int)
    assert preview.shape == (512 + 20, 512, 3)  # a caption line above
    image = preview[20:]
    glass, tissue = image[20, 20], image[420 // 3, 400 // 3]  # (y, x) in preview pixels
    assert glass.sum() < 0.8 * 3 * 240, "glass is dimmed"
    assert abs(tissue[0] - 228) < 60 and tissue[0] > tissue[1], "tissue keeps its colour"
