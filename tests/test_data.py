"""Training images read lazily: augmentation per region equals augmentation of the whole."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given
from hypothesis import strategies as st

import sstream.training.images
from sstream.data import Augmentation, PixelSource, Sample
from sstream.train import TrainConfig, load_training_image


@given(flip=st.booleans(), rotations=st.integers(0, 3), height=st.integers(1, 9),
       width=st.integers(1, 9), data=st.data())
def test_every_region_of_a_dihedral_transform_reads_only_its_source_region(
        flip, rotations, height, width, data):
    image = np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3)
    augmentation = Augmentation(flip=flip, rotations=rotations)
    whole = augmentation.apply(image)
    assert whole.shape[:2] == augmentation.shape(height, width)
    reads = []

    def read(y0, y1, x0, x1):
        reads.append((y1 - y0) * (x1 - x0))
        return image[y0:y1, x0:x1]

    reader = augmentation.region_reader(read, height, width)
    out_h, out_w = whole.shape[:2]
    y0 = data.draw(st.integers(0, out_h - 1))
    y1 = data.draw(st.integers(y0 + 1, out_h))
    x0 = data.draw(st.integers(0, out_w - 1))
    x1 = data.draw(st.integers(x0 + 1, out_w))
    assert np.array_equal(reader(y0, y1, x0, x1), whole[y0:y1, x0:x1])
    assert reads == [(y1 - y0) * (x1 - x0)]


@pytest.mark.parametrize("train", [True, False])
def test_large_images_are_read_lazily_with_the_same_pixels(tmp_path, monkeypatch, train):
    """Above IN_MEMORY_PIXELS the source reads regions from the open slide (and owns it);
    its pixels, crop and augmentation equal those of the image loaded whole."""
    rng = np.random.default_rng(0)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rng.integers(0, 256, (90, 70, 3), dtype=np.uint8), tile=(16, 16),
                     photometric="rgb")
    sample = Sample(path, 1, 2)
    config = TrainConfig(train_csv="x.csv", image_size=(64, 50), seed=5)
    whole = load_training_image(sample, config, train, (3, 1, 4))
    assert whole._slide is None
    monkeypatch.setattr(sstream.training.images, "IN_MEMORY_PIXELS", 0)
    lazy = load_training_image(sample, config, train, (3, 1, 4), torch.float64)
    assert lazy._slide is not None and lazy.dtype == torch.float64
    assert lazy.shape == whole.shape
    # the same pixels; the colour jitter rounds in each source's own dtype
    assert torch.allclose(lazy.read((5, 40, 7, 33)), whole.read((5, 40, 7, 33)).double(),
                          rtol=0, atol=1e-6)
    lazy.close()
    assert lazy._slide is None


def test_a_lazy_source_never_reads_the_whole_image():
    """The reads a tile plan makes through an augmented lazy source are regions only."""
    image = np.zeros((40, 30, 3), dtype=np.uint8)
    areas = []

    def read(y0, y1, x0, x1):
        areas.append((y1 - y0) * (x1 - x0))
        return image[y0:y1, x0:x1]

    source = PixelSource(read, 40, 30).augmented(Augmentation(flip=True, rotations=1),
                                                torch.float32)
    assert source.shape == (1, 3, 30, 40)
    source.read((0, 10, 5, 25))
    assert areas == [200]
