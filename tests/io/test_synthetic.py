"""Synthetic slides: reproducible, streamed pyramids whose label lives at full resolution."""

import csv

import numpy as np

from sstream.io import make_sample_data, open_image, write_synthetic_slide


def test_deterministic_and_seed_dependent(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tif", 300, 1, seed=5, tile=128)
    b = write_synthetic_slide(tmp_path / "b.tif", 300, 1, seed=5, tile=128)
    c = write_synthetic_slide(tmp_path / "c.tif", 300, 1, seed=6, tile=128)
    assert a == b and a != c
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    with open_image(tmp_path / "a.tif") as sa, open_image(tmp_path / "c.tif") as sc:
        assert not np.array_equal(sa.read_level(0), sc.read_level(0))
        assert sa.level_count == 3 and sa.mpp == 0.5  # 300 -> 150 -> 75 px with 128 px tiles


def test_labels_and_full_resolution_signal(tmp_path):
    negative = write_synthetic_slide(tmp_path / "n.tif", 512, 0, seed=1)
    positive = write_synthetic_slide(tmp_path / "p.tif", 512, 1, seed=2)
    assert not any(b.lesion for b in negative) and len(negative) >= 3
    assert any(b.lesion for b in positive)
    lesion = next(b for b in positive if b.lesion)
    decoy = next(b for b in negative if not b.lesion)

    def patch(path, blob, size=8):  # centred 8 x 8 window inside the blob
        with open_image(path) as slide:
            x, y = int(blob.x) - size // 2, int(blob.y) - size // 2
            return slide.read_region((x, y), 0, (size, size)).astype(float)

    lesion_patch, decoy_patch = patch(tmp_path / "p.tif", lesion), patch(tmp_path / "n.tif", decoy)
    # at full resolution the lesion is a high-contrast texture, the decoy is flat ...
    lesion_std, decoy_std = lesion_patch.std(axis=(0, 1)), decoy_patch.std(axis=(0, 1))
    assert lesion_std.min() > 40 and decoy_std.max() < 10, (lesion_std, decoy_std)
    # ... while their 4 x 4-pixel means, what a 4x downsampled level sees, nearly coincide
    lesion_mean = lesion_patch.reshape(2, 4, 2, 4, 3).mean(axis=(1, 3))
    decoy_mean = decoy_patch.reshape(2, 4, 2, 4, 3).mean(axis=(1, 3))
    assert np.abs(lesion_mean - decoy_mean).max() < 20


def test_make_sample_data(tmp_path):
    train, val = make_sample_data(tmp_path / "d", count=6, size=(128, 256), seed=3, tile=64)
    rows = {}
    for path in (train, val):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == ["image", "label"]
            rows[path.name] = list(reader)
    assert len(rows["train.csv"]) == 4 and len(rows["val.csv"]) == 2
    labels = [int(label) for _, label in rows["train.csv"] + rows["val.csv"]]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    for image, _ in rows["train.csv"]:
        with open_image(train.parent / image) as slide:  # paths are relative to the CSV
            assert 128 <= slide.dimensions[0] <= 256


def test_blobs_lie_on_tissue_and_the_tissue_fraction_is_honoured(tmp_path):
    """Lesions and decoys are centred on tissue (a tissue mask never hides them), and a
    slide asked for 20% tissue is about 20% tissue to the detector."""
    from sstream.io.tissue import detect_tissue

    for seed in range(6):
        blobs = write_synthetic_slide(tmp_path / f"{seed}.tif", 768, seed % 2, seed=seed,
                                      overwrite=True)
        with open_image(tmp_path / f"{seed}.tif") as slide:
            for blob in blobs:
                pixel = slide.read_region((int(blob.x) - 13, int(blob.y)), 0, (1, 1))[0, 0]
                assert pixel.min() < 225, f"seed {seed}: blob at {blob} borders glass"
    write_synthetic_slide(tmp_path / "sparse.tif", (2048, 1536), 1, seed=3,
                          tissue_fraction=0.2)
    with open_image(tmp_path / "sparse.tif") as slide:
        assert abs(detect_tissue(slide).fraction - 0.2) < 0.05


def test_regression_data_scales_the_lesion_texture_that_a_downsample_erases(tmp_path):
    """Regression data: the label is the lesions' texture contrast; the texture's spread
    follows it, while its 4 x 4-pixel means (a 4x downsampled level) stay the decoy colour;
    make-sample-data writes the contrasts as labels, slide by slide."""
    spreads, means = [], []
    for contrast in (0.0, 0.5, 1.0):
        blobs = write_synthetic_slide(tmp_path / "s.tif", 512, 1, seed=2, contrast=contrast,
                                      overwrite=True)
        lesion = next(b for b in blobs if b.lesion)
        with open_image(tmp_path / "s.tif") as slide:
            x, y = int(lesion.x) - 4, int(lesion.y) - 4
            patch = slide.read_region((x, y), 0, (8, 8)).astype(float)
        spreads.append(patch.std(axis=(0, 1)).min())
        means.append(patch.reshape(2, 4, 2, 4, 3).mean(axis=(1, 3)))
    assert spreads[0] < 10 < spreads[1] < spreads[2] - 10
    assert max(np.abs(m - means[0]).max() for m in means) < 20
    train, val = make_sample_data(tmp_path / "d", count=4, size=256, seed=3, tile=64,
                                  regression=True)
    for path in (train, val):
        with open(path, newline="") as f:
            for image, label in list(csv.reader(f))[1:]:
                assert 0 <= float(label) <= 1
                index = int(image.split("_")[1].split(".")[0])
                write_synthetic_slide(tmp_path / "again.tif", 256, 1, seed=3 * 100003 + index,
                                      tile=64, contrast=float(label), overwrite=True)
                assert (train.parent / image).read_bytes() == \
                    (tmp_path / "again.tif").read_bytes()
