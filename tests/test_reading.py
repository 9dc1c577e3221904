"""How slides are read (`sstream.reading`): one ReadSpec for every job, exact µm-per-pixel
reads, reads that follow the model's checkpoint, and a loaded model that answers as predict.

The scans are lossless TIFF pyramids of one smooth synthetic field, so that two scans of
"the same tissue" can be compared pixel for pixel.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from sstream.cli import app
from sstream.engine import StreamingCNN
from sstream.io import open_image, write_synthetic_slide
from sstream.io.resample import resample_array
from sstream.models import (
    ModelConfig,
    build_model,
    checkpoint_payload,
    load_checkpoint,
    streamed_logits,
)
from sstream.predict import PredictConfig, predict
from sstream.reading import ReadSpec, ReadSpecError, model_input
from sstream.saliency import compute_saliency
from sstream.train import TrainConfig, train
from tests.conftest import float64_training, relative_error

runner = CliRunner()
FIELD = 384  # level 0 side of the 0.25 µm/px scan


def field(side: int, seed: int) -> np.ndarray:
    """A smooth random colour field (h, w, 3) uint8: blobs and gradients, no flat glass."""
    noise = np.random.default_rng(seed).integers(0, 256, (side // 8, side // 8, 3),
                                                  dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((side, side), Image.Resampling.BICUBIC))


def write_scan(path: Path, level0: np.ndarray, mpp: float | None, steps: tuple[int, ...]
               ) -> Path:
    """A lossless tiled pyramid: level 0, then one reduced level per step."""
    tags = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp),
                                       resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as writer:
        writer.write(level0, tile=(64, 64), photometric="rgb", **tags)
        for step in steps:
            writer.write(np.ascontiguousarray(level0[::step, ::step]), tile=(64, 64),
                         photometric="rgb", subfiletype=1)
    return path


def write_checkpoint(path: Path, **config: object) -> Path:
    """A random tiny model whose checkpoint records `config` (read, tissue...)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", num_classes=2, **config))
    torch.save(checkpoint_payload(model), path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One field scanned twice: at 0.25 µm/px with only a 4x coarser level, and at
    0.5 µm/px (the first scan's level 0 resampled to 0.5) with a 2x level."""
    root = tmp_path_factory.mktemp("scans")
    fine = field(FIELD, 0)
    coarse = resample_array(fine, (2.0, 2.0))
    return {"fine": write_scan(root / "fine.tif", fine, 0.25, (4,)),
            "coarse": write_scan(root / "coarse.tif", coarse, 0.5, (2,)),
            "root": root}


def probabilities(checkpoint: Path, image: Path, **options: object) -> np.ndarray:
    result = predict(PredictConfig(str(checkpoint), [str(image)], device="cpu",
                                   tile_size=64, **options))
    assert not result.failures, result.failures
    return np.array(result.predictions[0].values)


# ---- the spec -------------------------------------------------------------------------


def test_a_spec_checks_itself_once_and_round_trips():
    spec = ReadSpec(mpp=0.5, assume_mpp=0.25, image_size=(64, 80), tissue="auto")
    assert ReadSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.record() == {"level": None, "mpp": 0.5, "image_size": [64, 80]}
    for bad, message in [(dict(level=1, mpp=0.5), "not both"), (dict(mpp=0.0), "--mpp"),
                         (dict(mpp=float("nan")), "--mpp"), (dict(level=-1), "--level"),
                         (dict(assume_mpp=-2.0), "--assume-mpp"),
                         (dict(image_size=(0, 4)), "--image-size")]:
        with pytest.raises(ReadSpecError, match=message):
            ReadSpec(**bad)
    with pytest.raises(ReadSpecError, match="unknown read settings colour"):
        ReadSpec.from_dict({"colour": 1})


def test_old_checkpoints_read_level_0_whole_and_options_replace_the_record():
    old = ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items()
                                 if k not in ("read", "tile_size")})
    assert ReadSpec.for_model(old) == ReadSpec(tissue="none")
    trained = ReadSpec.for_model(ModelConfig(read={"mpp": 0.5, "image_size": [64, 64]},
                                             tissue="auto"))
    assert trained == ReadSpec(mpp=0.5, image_size=(64, 64), tissue="auto")
    assert trained.overridden() == trained and trained.notes(trained) == []
    at_level = trained.overridden(level=1)
    assert (at_level.level, at_level.mpp, at_level.image_size) == (1, None, (64, 64))
    assert at_level.notes(trained) == ["model trained at 0.5 µm/px, reading at level 1"]
    assert trained.overridden(mpp=0.25, tissue="none").notes(trained) == [
        "model trained at 0.5 µm/px, reading at 0.25 µm/px",
        "model trained pooling over tissue auto, pooling over tissue none"]


# ---- exact physical resolution --------------------------------------------------------


def test_the_engine_on_a_resampled_read_equals_autograd_on_the_resampled_image(scans):
    """float64: the streamed logits and parameter gradients on the lazily resampled slide
    equal plain autograd on the whole resampled image (which equals resample_array)."""
    with float64_training(), ReadSpec(mpp=0.7).open(scans["fine"]) as read:
        read.source.dtype = torch.float64
        whole = read.source.to_tensor()
        with open_image(scans["fine"]) as slide:
            expected = resample_array(slide.read_level(0), read.resolution.scale)
        assert torch.equal(whole, torch.from_numpy(expected).permute(2, 0, 1)[None] / 255.0)
        torch.manual_seed(0)
        model = build_model(ModelConfig("tiny", 2)).eval()
        plain = model(whole)
        plain[0, 1].backward()
        plain_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        streamed = streamed_logits(model, StreamingCNN(model.stream, 48), read.source)
        streamed[0, 1].backward()
        assert relative_error(streamed, plain) < 1e-9
        for param, want in zip(model.parameters(), plain_grads, strict=True):
            assert relative_error(param.grad, want) < 1e-9


def test_two_scans_of_one_field_predict_alike_at_the_models_mpp(scans):
    """A model trained at 0.5 µm/px: the 0.25 µm/px scan (whose only other level is 4x
    coarser) read at the recorded 0.5 equals the 0.5 µm/px scan, exactly; read at level 0
    (the old behaviour of --mpp 0.5 there) the predictions differ."""
    checkpoint = write_checkpoint(scans["root"] / "at05.pt", read={"mpp": 0.5})
    fine = probabilities(checkpoint, scans["fine"])
    assert np.array_equal(fine, probabilities(checkpoint, scans["coarse"]))
    assert not np.allclose(probabilities(checkpoint, scans["fine"], level=0), fine,
                           atol=1e-4)


def test_a_slide_without_mpp_is_one_line_unless_one_is_assumed(tmp_path):
    Image.fromarray(field(128, 3)).save(tmp_path / "plain.png")
    checkpoint = write_checkpoint(tmp_path / "at05.pt", read={"mpp": 0.5})
    failed = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint), "--device",
                                 "cpu", str(tmp_path / "plain.png")])
    said = " ".join(failed.output.split())
    assert failed.exit_code == 1
    assert "plain.png: states no resolution" in said
    assert "--assume-mpp" in said and "Traceback" not in said
    assumed = probabilities(checkpoint, tmp_path / "plain.png", assume_mpp=0.25)
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "mpp"], ["plain.png", "0.25"]])
    by_column = predict(PredictConfig(str(checkpoint), csv=str(tmp_path / "list.csv"),
                                      device="cpu", tile_size=64))
    assert np.array_equal(by_column.predictions[0].values, assumed)


def test_read_options_that_cannot_work_are_usage_errors(scans):
    """Checked once (ReadSpec), answered alike by every command: exit 2, one line."""
    checkpoint, slide = str(write_checkpoint(scans["root"] / "plain.pt")), str(scans["fine"])
    both = ["--level", "1", "--mpp", "0.5"]
    for command in (["predict", "--checkpoint", checkpoint, slide, *both],
                    ["saliency", "--checkpoint", checkpoint, slide, *both],
                    ["verify", "--image", slide, *both],
                    ["predict", "--checkpoint", checkpoint, slide, "--assume-mpp", "0"],
                    ["info", slide, "--mpp", "nan"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert len(result.output.strip().splitlines()) == 1


# ---- reads that follow the model ------------------------------------------------------


def test_a_model_trained_at_level_1_predicts_alike_with_no_read_options(tmp_path):
    """The checkpoint records the level and tile; predict without options equals predict
    --level 1, and an explicit --level 0 differs and says so in one line."""
    rows = []
    for index in range(2):
        write_scan(tmp_path / f"s{index}.tif", field(256, 10 + index), 0.5, (2,))
        rows.append([f"s{index}.tif", index])
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "label"], *rows])
    train(TrainConfig(train_csv=str(tmp_path / "train.csv"), out=str(tmp_path / "run"),
                      epochs=1, tile_size=64, device="cpu", level=1, tissue="none"))
    checkpoint = tmp_path / "run" / "last.pt"
    config = load_checkpoint(checkpoint).config
    assert (config.read, config.tile_size) == (
        {"level": 1, "mpp": None, "image_size": None}, 64)
    image = tmp_path / "s0.tif"
    recorded = predict(PredictConfig(str(checkpoint), [str(image)], device="cpu"))
    assert recorded.notes == []
    assert np.array_equal(recorded.predictions[0].values,
                          probabilities(checkpoint, image, level=1))
    told = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint), "--device", "cpu",
                               "--level", "0", str(image)])
    assert told.exit_code == 0, told.output
    assert "model trained at level 1, reading at level 0" in " ".join(told.output.split())


def test_the_loaded_model_answers_as_predict_does(tmp_path):
    """With the checkpoint's defaults (tissue auto, a resampled mpp): model_input gives
    predict's pixels and tissue mask, and model(x, mask=...) gives its probabilities."""
    image = tmp_path / "slide.tif"
    write_synthetic_slide(image, 512, 1, 4, tile=128, mpp=4.0, tissue_fraction=0.4)
    checkpoint = write_checkpoint(tmp_path / "auto.pt", tissue="auto", read={"mpp": 6.0})
    model = load_checkpoint(checkpoint).eval()
    x = model_input(model, image)
    assert x.resolution.resampled and x.pixels.shape[-1] == round(512 / 1.5)
    assert x.mask is not None and 0 < x.mask.float().mean() < 1
    with torch.no_grad():
        answered = torch.softmax(model(x.pixels, mask=x.mask), dim=1)[0].double().numpy()
        unmasked = torch.softmax(model(x.pixels), dim=1)[0].double().numpy()
    predicted = probabilities(checkpoint, image)
    assert np.abs(answered - predicted).max() < 1e-6
    assert np.abs(unmasked - predicted).max() > 1e-4  # the mask matters here


def test_a_saliency_map_of_an_mpp_read_carries_its_resolution(scans):
    checkpoint = write_checkpoint(scans["root"] / "sal.pt", read={"mpp": 0.5})
    out = scans["root"] / "map.tif"
    result = compute_saliency(scans["fine"], checkpoint, out, tile_size=64, device="cpu")
    assert (result.size, result.mpp, result.resize, result.notes) == (
        (FIELD // 2, FIELD // 2), 0.5, 0.5, [])
    with open_image(out) as written:
        assert written.dimensions == (FIELD // 2, FIELD // 2)
        assert written.mpp == pytest.approx(0.5)
    record = json.loads(tifffile.TiffFile(out).pages.first.description)
    assert (record["level"], record["mpp"], record["resize"]) == (0, 0.5, 0.5)
    again = compute_saliency(scans["fine"], checkpoint, scans["root"] / "map1.tif",
                             tile_size=64, device="cpu", mpp=1.0)
    assert again.notes == ["model trained at 0.5 µm/px, reading at 1 µm/px"]


def test_info_shows_the_level_and_resize_factor_an_mpp_reads(scans):
    result = runner.invoke(app, ["info", str(scans["fine"]), "--mpp", "0.5"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"--mpp reads level 0 resized by 0.5: {FIELD // 2} x {FIELD // 2} px" in \
        " ".join(result.output.split())
    as_json = runner.invoke(app, ["info", str(scans["fine"]), "--mpp", "1.0", "--json"])
    record = json.loads(as_json.output)[0]
    assert (record["chosen_level"], record["resize"]) == (1, 1.0)


def test_view_places_an_mpp_map_by_its_physical_size(scans, tmp_path):
    """The map of a 0.5 µm/px read covers the 0.25 µm/px slide at half its pixels per slide
    pixel; a map whose stated µm per pixel does not fit the slide is refused."""
    from sstream.io import TiffMapWriter
    from sstream.view import make_server

    checkpoint = write_checkpoint(tmp_path / "sal.pt", read={"mpp": 0.5})
    out = tmp_path / "map.tif"
    compute_saliency(scans["fine"], checkpoint, out, tile_size=64, device="cpu")
    server = make_server(scans["fine"], overlays=[out], port=0)
    try:
        assert server.source.layers[1].per_slide_pixel == (0.5, 0.5)
        tile = server.source.tile("overlay0", server.source.max_level, 0, 0)
        assert Image.open(io.BytesIO(tile)).size == (256, 256)
    finally:
        server.server_close()
        server.source.close()
    wrong = tmp_path / "wrong.tif"
    with TiffMapWriter(wrong, (FIELD // 2, FIELD // 2), np.float32, tile_size=64,
                       description=json.dumps({"mpp": 1.0})) as writer:
        writer.write_band(0, np.ones((FIELD // 2, FIELD // 2), np.float32))
    with pytest.raises(ValueError, match="does not overlay"):
        make_server(scans["fine"], overlays=[wrong], port=0)


def test_a_model_trained_on_crops_predicts_on_crops_unless_told_whole(scans):
    checkpoint = write_checkpoint(scans["root"] / "crops.pt", read={"image_size": [96, 96]})
    on_crops = predict(PredictConfig(str(checkpoint), [str(scans["coarse"])], device="cpu"))
    whole = predict(PredictConfig(str(checkpoint), [str(scans["coarse"])], device="cpu",
                                  whole_image=True))
    assert on_crops.notes == []
    assert whole.notes == ["model trained on 96 x 96 crops, reading whole images"]
    assert not np.allclose(on_crops.predictions[0].values, whole.predictions[0].values)
    centre = (FIELD // 2 - 96) // 2
    with open_image(scans["coarse"]) as slide:
        crop = slide.read_region((centre, centre), 0, (96, 96))
    model = load_checkpoint(checkpoint).eval()
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(crop).permute(2, 0, 1)[None] / 255.0),
                                 dim=1)[0].double().numpy()
    assert np.abs(np.array(on_crops.predictions[0].values) - expected).max() < 1e-6


def test_random_crops_of_a_resampled_read_are_centred_on_tissue(tmp_path):
    """Training's random window at an mpp (resampled) is centred on a random tissue point
    (the generator's first draw), to the output pixel, unless the image's border stops it;
    its pixels are the resampled image's."""
    image = tmp_path / "slide.tif"
    write_synthetic_slide(image, 512, 1, 5, tile=128, mpp=4.0, tissue_fraction=0.3)
    spec = ReadSpec(mpp=6.0, image_size=(48, 48), tissue="auto")
    with open_image(image) as slide:
        whole = resample_array(slide.read_level(0), (1.5, 1.5))
    checked = 0
    for seed in range(5):
        with spec.open(image, np.random.default_rng(seed)) as read:
            y0, _, x0, _ = read.window
            assert np.array_equal(read.source.to_rgb_array(), whole[y0:y0 + 48, x0:x0 + 48])
            point_x, point_y = read.source.tissue.random_point(np.random.default_rng(seed))
            level0_y, level0_x = read.source.level0(np.array(24.0), np.array(24.0))
            for axis, (start, centre, point) in enumerate(((y0, level0_y, point_y),
                                                           (x0, level0_x, point_x))):
                if 0 < start < whole.shape[axis] - 48:  # not stopped by the border
                    assert abs(centre - point) <= 1.5  # an output pixel, in level-0 pixels
                    checked += 1
    assert checked >= 5
