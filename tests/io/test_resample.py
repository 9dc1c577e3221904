"""Exact µm-per-pixel reads (`sstream.io.resample`): any region read streamed equals the
same region of the whole level resampled at once, pixel for pixel; the resampling itself is
Pillow's antialiased bicubic (within its inter-pass rounding); the level and scale follow the
slide's stated resolution, or the one assumed for a slide that states none.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sstream.io import ImageReadError, open_image
from sstream.io.resample import SAME_SCALE, ResampledLevel, resample_array, resolve_read

HEIGHT, WIDTH = 203, 257  # level 0; the 4x level is 50 x 64


def smooth_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """Random colours blurred a little: a slide-like image with edges and gradients."""
    noise = np.random.default_rng(seed).integers(0, 256, (height // 3 + 1, width // 3 + 1, 3),
                                                  dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC))


def write_scan(path, level0: np.ndarray, mpp: float | None, steps: tuple[int, ...] = (4,)
               ) -> list[np.ndarray]:
    """A lossless tiled pyramid: level 0 and one level per step (reduced pages), with
    resolution tags for `mpp` µm per pixel (none for None). Returns the levels written."""
    levels = [level0] + [np.ascontiguousarray(level0[::s, ::s]) for s in steps]
    resolution = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp),
                                             resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as writer:
        writer.write(levels[0], tile=(32, 32), photometric="rgb", **resolution)
        for level in levels[1:]:
            writer.write(level, tile=(32, 32), photometric="rgb", subfiletype=1)
    return levels


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory):
    """A scan at 0.25 µm/px whose only other level is 4x coarser (1.0 µm/px)."""
    path = tmp_path_factory.mktemp("resample") / "scan.tif"
    levels = write_scan(path, smooth_rgb(HEIGHT, WIDTH, 0), 0.25)
    return path, levels


@settings(max_examples=40, deadline=None)
@given(mpp=st.floats(0.2, 1.6), data=st.data())
def test_a_streamed_region_equals_the_whole_level_resampled(scan, mpp, data):
    """Regions of any size and place (crossing the border too: white outside) equal the
    whole-level resample's pixels exactly."""
    path, levels = scan
    with open_image(path) as slide:
        resolution = resolve_read(slide, mpp=mpp)
        level = ResampledLevel(slide, resolution)
        whole = (resample_array(levels[resolution.level], resolution.scale)
                 if resolution.resampled else levels[resolution.level])
        assert whole.shape[:2] == (level.height, level.width)
        for _ in range(3):
            y0 = data.draw(st.integers(-5, level.height - 1))
            x0 = data.draw(st.integers(-5, level.width - 1))
            y1 = data.draw(st.integers(y0 + 1, level.height + 5))
            x1 = data.draw(st.integers(x0 + 1, level.width + 5))
            expected = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
            iy0, ix0 = max(y0, 0), max(x0, 0)
            iy1, ix1 = min(y1, level.height), min(x1, level.width)
            if iy0 < iy1 and ix0 < ix1:
                expected[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = whole[iy0:iy1, ix0:ix1]
            assert np.array_equal(level.read(y0, y1, x0, x1), expected)


@pytest.mark.parametrize("scale", [2.0, 1.37, 4.1, 0.8, 1.0043])
def test_the_resampling_is_pillows_antialiased_bicubic(scale):
    """Against Pillow's own resize of the same box: at most one grey level apart (Pillow
    rounds to uint8 between its two passes) away from saturation, where Pillow also clips
    the first pass's overshoot (a few levels), and mostly equal."""
    rgb = smooth_rgb(HEIGHT, WIDTH, 1)
    ours = resample_array(rgb, (scale, scale))
    assert ours.shape[:2] == (round(HEIGHT / scale), round(WIDTH / scale))
    height, width = int(HEIGHT / scale), int(WIDTH / scale)  # Pillow's box stays inside
    pillow = np.asarray(Image.fromarray(rgb).resize(
        (width, height), Image.Resampling.BICUBIC, box=(0, 0, width * scale, height * scale)))
    ours = ours[:height, :width].astype(int)
    difference = np.abs(ours - pillow)
    unsaturated = (np.minimum(ours, pillow) >= 32) & (np.maximum(ours, pillow) <= 223)
    assert difference[unsaturated].max() <= 1
    assert difference.max() <= 4
    assert (difference == 0).mean() > 0.7


def test_flat_areas_stay_flat():
    """The weights of every output pixel sum to exactly one: a flat image stays flat."""
    for value in (0, 1, 128, 254, 255):
        flat = np.full((67, 91, 3), value, np.uint8)
        for scale in (0.7, 1.9, 3.3):
            assert np.all(resample_array(flat, (scale, scale)) == value)


def test_the_level_read_is_the_finest_not_coarser_than_asked(scan):
    """0.25 µm/px level 0 and a ~1.0 µm/px level (257 px -> 65: 0.9885 µm/px): 0.5 and
    0.8 resample level 0, 1.0 and 2.0 level 1, 0.2 enlarges level 0, a level within
    SAME_SCALE is read as it is; the mpp read is always exact."""
    path, _ = scan
    with open_image(path) as slide:
        level1_mpp = 0.25 * WIDTH / slide.level_dimensions[1][0]
        for mpp, level, scale in [(0.5, 0, 2.0), (0.8, 0, 3.2), (1.0, 1, 1.0 / level1_mpp),
                                  (2.0, 1, 2.0 / level1_mpp), (0.2, 0, 0.8),
                                  (0.25 * (1 + SAME_SCALE / 2), 0, 1.0)]:
            resolution = resolve_read(slide, mpp=mpp)
            assert resolution.level == level
            assert resolution.scale[1] == pytest.approx(scale, rel=1e-9)
            assert resolution.resize == pytest.approx(1 / scale, rel=1e-2)
            if resolution.resampled:
                assert resolution.mpp == mpp
                width, height = slide.level_dimensions[level]
                scale_y = mpp / (0.25 * HEIGHT / height)  # per axis: 203 px -> 51
                assert resolution.scale[0] == pytest.approx(scale_y, rel=1e-9)
                assert resolution.size == (round(width / scale), round(height / scale_y))
        native = resolve_read(slide, level=1)
        assert (native.level, native.resampled, native.mpp) == (1, False, pytest.approx(
            0.25 * slide.level_downsamples[1]))
        with pytest.raises(ValueError, match="level 2 does not exist"):
            resolve_read(slide, level=2)


def test_a_slide_without_mpp_is_refused_unless_one_is_assumed(tmp_path):
    path = tmp_path / "plain.tif"
    write_scan(path, smooth_rgb(64, 80, 2), None, steps=())
    with open_image(path) as slide:
        with pytest.raises(ImageReadError, match=r"plain\.tif: states no resolution.*"
                                                 r"--assume-mpp"):
            resolve_read(slide, mpp=0.5)
        assumed = resolve_read(slide, mpp=0.5, assume_mpp=0.25)
        assert (assumed.level, assumed.size, assumed.mpp) == (0, (40, 32), 0.5)
        assert resolve_read(slide).mpp is None  # level 0 as it is needs no resolution
    stated = tmp_path / "stated.tif"
    write_scan(stated, smooth_rgb(64, 80, 2), 0.5, steps=())
    with open_image(stated) as slide:  # a stated resolution wins over an assumed one
        assert resolve_read(slide, mpp=0.5, assume_mpp=0.25).resampled is False
