"""Tissue masks through the jobs: train, predict, saliency and `sstream tissue` agree.

The slides are synthetic (`write_synthetic_slide`) at 4 µm per pixel, so that a 512 px slide
is 2 mm wide and its tissue islands are the size the detector's clean-up expects.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from sstream.cli import app
from sstream.data import Augmentation, PixelSource
from sstream.engine import StreamingCNN
from sstream.io import open_image, write_synthetic_slide
from sstream.io.tissue import TissueMask
from sstream.models import ModelConfig, build_model, load_checkpoint
from sstream.predict import PredictConfig, predict
from sstream.saliency import compute_saliency
from sstream.tissue import Tissue, output_mask
from sstream.train import TrainConfig, train

runner = CliRunner()
MPP = 4.0


def slide(path: Path, label: int = 1, seed: int = 0, fraction: float = 0.4) -> Path:
    write_synthetic_slide(path, 512, label, seed, tile=128, mpp=MPP, tissue_fraction=fraction)
    return path


def half_tissue(width: int, height: int) -> TissueMask:
    """Tissue on the left half of a width x height slide, as an 8 x 8 mask."""
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    return TissueMask(mask, (width / 8, height / 8), "test")


@pytest.mark.parametrize("flip, rotations", [(False, 0), (True, 0), (False, 1), (True, 3)])
def test_output_masks_follow_crops_flips_and_rotations(flip, rotations):
    """An image whose left half is tissue: under each dihedral transform, the outputs whose
    receptive-field centres fall on the transformed tissue half are the masked ones."""
    stream = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 5, 2, 2), torch.nn.Conv2d(2, 2, 3, 2))
    rgb = np.zeros((96, 64, 3), np.uint8)
    rgb[:, :32] = 255  # the tissue half, as the mask says
    augmentation = Augmentation(flip=flip, rotations=rotations)
    source = PixelSource.from_array(rgb, augmentation)
    source.tissue = half_tissue(64, 96)
    scnn = StreamingCNN(stream, 16)
    mask = output_mask(source, scnn)
    with torch.no_grad():
        assert mask.shape == stream(torch.zeros(1, 3, *source.shape[-2:])).shape[-2:]
    window = scnn.geometry.axis(0)
    centre = lambda j: int(j * window.stride + (window.hi - window.lo + 1) / 2)  # noqa: E731
    image = augmentation.apply(rgb)[..., 0]
    for (i, j), masked in np.ndenumerate(mask.numpy()):
        assert masked == (image[centre(i), centre(j)] == 255), (i, j)


def test_a_mask_file_with_no_tissue_under_the_image_is_a_one_line_error():
    """A mask file that marks no output's centre is refused; a detected one means the whole
    image counts (auto never refuses an image)."""
    source = PixelSource.from_array(np.zeros((64, 64, 3), np.uint8))
    source.tissue = TissueMask(np.zeros((4, 4), bool), (16, 16), "mask.png")
    scnn = StreamingCNN(torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3)), 16)
    with pytest.raises(ValueError, match="no tissue under the image .*sstream tissue"):
        output_mask(source, scnn)
    source.tissue = TissueMask(np.zeros((4, 4), bool), (16, 16), "auto")
    assert output_mask(source, scnn) is None


def test_auto_uses_the_whole_image_where_it_finds_no_tissue(tmp_path):
    """A grayscale image has no stain to find: auto gives no mask, so nothing is refused."""
    gray = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    with open_image(tmp_path / "gray.tif") as image:
        assert Tissue("auto").mask_for(image) is None


def write_csv(path: Path, rows: list[tuple[str, int, str]], header=("image", "label", "mask")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([row[:len(header)] for row in rows])
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained two steps with the default tissue choice on slides with glass."""
    root = tmp_path_factory.mktemp("tissue")
    rows = [(slide(root / f"s{i}.tif", i % 2, i).name, i % 2, "") for i in range(4)]
    settings = TrainConfig(train_csv=str(write_csv(root / "train.csv", rows)),
                           out=str(root / "run"), epochs=1, accumulate=2, tile_size=128,
                           device="cpu")
    train(settings)
    return root


def test_training_records_auto_and_previews_the_first_slides(trained):
    model = load_checkpoint(trained / "run" / "last.pt")
    assert model.config.tissue == "auto"
    previews = sorted(p.name for p in (trained / "run" / "tissue").iterdir())
    assert previews == [f"line{i + 2}_s{i}.png" for i in range(4)]


def test_predict_uses_the_checkpoints_choice_unless_told_otherwise(trained):
    """Default = the checkpoint's auto; --tissue none pools over glass too and differs."""
    image = str(slide(trained / "glassy.tif", 1, 11, fraction=0.3))
    checkpoint = str(trained / "run" / "last.pt")

    def probabilities(tissue):
        result = predict(PredictConfig(checkpoint, [image], tile_size=128, device="cpu",
                                       tissue=tissue))
        assert not result.failures, result.failures
        return result.predictions[0].values

    assert probabilities(None) == probabilities("auto")
    assert probabilities("none") != probabilities("auto")


def test_saliency_is_zero_on_glass(trained):
    image = slide(trained / "sal.tif", 1, 12, fraction=0.3)
    result = compute_saliency(image, trained / "run" / "last.pt", trained / "sal.map.tif",
                              tile_size=128, device="cpu")
    saliency = tifffile.imread(trained / "sal.map.tif")
    with open_image(image) as opened:
        tissue = Tissue("auto").mask_for(opened)
    ys, xs = np.mgrid[0:512, 0:512] + 0.5
    on_tissue = tissue.sample(xs, ys)
    assert not saliency[~on_tissue].any() and saliency[on_tissue].any()
    assert result.nonzero == np.count_nonzero(saliency)


def test_a_mask_column_and_a_mask_file_reach_every_job(trained, tmp_path):
    """A hand-made mask (the left half) in the CSV's mask column, and as --tissue PATH for
    one slide, give the same prediction; and differ from auto."""
    image = slide(tmp_path / "one.tif", 1, 13, fraction=0.5)
    left = np.zeros((100, 100), np.uint8)
    left[:, :50] = 255
    from PIL import Image

    Image.fromarray(left).save(tmp_path / "left.png")
    checkpoint = str(trained / "run" / "last.pt")
    by_column = predict(PredictConfig(checkpoint, csv=str(write_csv(
        tmp_path / "list.csv", [("one.tif", 1, "left.png")])), tile_size=128, device="cpu"))
    by_option = predict(PredictConfig(checkpoint, [str(image)], tile_size=128, device="cpu",
                                      tissue=str(tmp_path / "left.png")))
    automatic = predict(PredictConfig(checkpoint, [str(image)], tile_size=128, device="cpu"))
    assert by_column.predictions[0].values == by_option.predictions[0].values
    assert by_option.predictions[0].values != automatic.predictions[0].values


@pytest.mark.parametrize("content, message", [
    ("text", "mask.png"),                 # not an image
    ("empty", "selects no tissue"),
    ("wide", "aspect ratios differ"),
])
def test_bad_masks_get_one_line_errors(trained, tmp_path, content, message):
    from PIL import Image

    mask = tmp_path / "mask.png"
    if content == "text":
        mask.write_text("not a mask")
    else:
        Image.fromarray(np.zeros((50, 200 if content == "wide" else 50), np.uint8)
                        + (content == "wide")).save(mask)
    image = slide(tmp_path / "one.tif", 1, 14)
    done = runner.invoke(app, ["saliency", str(image), "--checkpoint",
                               str(trained / "run" / "last.pt"), "--tissue", str(mask),
                               "--out", str(tmp_path / "map.tif"), "--no-overview"])
    assert done.exit_code == 1
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.output
    assert not (tmp_path / "map.tif").exists()


def test_training_refuses_a_missing_mask_and_a_tissue_file(tmp_path):
    image = slide(tmp_path / "a.tif")
    csv_path = write_csv(tmp_path / "train.csv", [("a.tif", 1, "nowhere.png"),
                                                   ("a.tif", 0, "")])
    with pytest.raises(ValueError, match=r"line 2: mask not found: .*nowhere.png"):
        train(TrainConfig(train_csv=str(csv_path), out=str(tmp_path / "run"), device="cpu"))
    with pytest.raises(ValueError, match="mask file belongs to one slide"):
        train(TrainConfig(train_csv=str(csv_path), tissue=str(image), device="cpu"))


def test_a_split_point_keeps_the_feature_map_and_refuses_explicit_auto(tmp_path):
    image = slide(tmp_path / "a.tif")
    csv_path = write_csv(tmp_path / "train.csv", [("a.tif", 1, ""), ("a.tif", 0, "")][:1],
                         header=("image", "label"))
    with pytest.raises(ValueError, match="--tissue auto needs the whole-slide path"):
        train(TrainConfig(train_csv=str(csv_path), out=str(tmp_path / "a"), device="cpu",
                          stream_layers="stage3", tissue="auto"))
    result = train(TrainConfig(train_csv=str(csv_path), out=str(tmp_path / "b"), device="cpu",
                               stream_layers="stage3", epochs=1, tile_size=128))
    assert result.model.config.tissue == "none"
    assert image.exists()


def test_the_tissue_command_writes_a_preview_and_the_mask(tmp_path):
    image = slide(tmp_path / "a.tif", fraction=0.3)
    done = runner.invoke(app, ["tissue", str(image), "--mask", str(tmp_path / "mask.png")])
    assert done.exit_code == 0, done.output
    assert "tissue" in done.output and "a.tif.tissue.png" in done.output
    from PIL import Image

    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
    assert 0.2 < (mask > 0).mean() < 0.4
    preview = Image.open(tmp_path / "a.tif.tissue.png")
    assert preview.size[0] == 512
    again = runner.invoke(app, ["tissue", str(image)])  # the preview exists now
    assert again.exit_code == 1 and "already exists" in again.output
    none = runner.invoke(app, ["tissue", str(image), "--tissue", "none", "--overwrite"])
    assert none.exit_code == 2 and "no mask to preview" in " ".join(none.output.split())


def test_model_configs_from_before_tissue_masks_load_as_none():
    assert ModelConfig.from_dict({"name": "tiny", "num_classes": 2}).tissue == "none"
    with pytest.raises(ValueError, match="tissue must be 'auto' or 'none'"):
        build_model(ModelConfig(tissue="maybe"))
