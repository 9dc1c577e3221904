"""sstream heatmap: attention weights and class activation maps of whole slides, as
pyramidal TIFFs that overlay the slide, against plain PyTorch on the whole image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from sstream.cli import app
from sstream.heatmap import HeatmapError, compute_heatmap
from sstream.models import load_checkpoint
from sstream.view import TileSource
from tests.conftest import relative_error
from tests.test_saliency import MPP, make_checkpoint, make_slide


def whole_image(checkpoint: Path, rgb: np.ndarray):
    """(model, its stream's feature map (1, C', H', W')) on the whole image, plain PyTorch."""
    model = load_checkpoint(checkpoint).eval()
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return model, model.stream(x)


def read_map(path: Path) -> tuple[np.ndarray, dict]:
    with tifffile.TiffFile(path) as tiff:
        return tiff.pages[0].asarray(), json.loads(tiff.pages[0].description)


def test_attention_heatmap_values_are_the_softmax_weights(tmp_path: Path) -> None:
    rgb = make_slide(tmp_path / "slide.tif")
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", pooling="attention",
                                 attention_hidden=8)
    result = compute_heatmap(tmp_path / "slide.tif", checkpoint, tmp_path / "map.tif",
                             tile_size=64, tissue="none")
    model, fmap = whole_image(checkpoint, rgb)
    with torch.no_grad():
        want = model.head[0].weights(fmap)[0, 0].numpy()  # (H', W')
    heatmap, record = read_map(result.out)
    assert heatmap.shape == want.shape and result.kind == "attention"
    assert relative_error(torch.from_numpy(heatmap), torch.from_numpy(want)) < 1e-5
    assert abs(heatmap.sum() - 1) < 1e-4
    assert record["sstream"] == "heatmap" and record["mpp"] == pytest.approx(MPP * 16)
    with torch.no_grad():
        logits = model(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0]
    assert record["predicted_class"] == int(logits.argmax())
    TileSource(tmp_path / "slide.tif", [result.out]).close()  # overlays the slide in view


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_class_activation_map_is_the_classifier_on_the_feature_map(tmp_path: Path,
                                                                   pooling: str) -> None:
    rgb = make_slide(tmp_path / "slide.tif")
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", pooling=pooling)
    out = tmp_path / "cam.tif"
    runner = CliRunner()
    done = runner.invoke(app, ["heatmap", str(tmp_path / "slide.tif"), "--checkpoint",
                               str(checkpoint), "--out", str(out), "--class", "2",
                               "--tile-size", "64", "--tissue", "none", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    model, fmap = whole_image(checkpoint, rgb)
    fc = model.head.fc
    with torch.no_grad():
        want = (torch.einsum("kc,chw->khw", fc.weight, fmap[0]) + fc.bias[:, None, None])[2]
    heatmap, record = read_map(out)
    assert relative_error(torch.from_numpy(heatmap), want) < 1e-5
    assert record["kind"] == "cam" and record["class"] == 2
    if pooling == "avg":  # the CAM's mean is the logit
        with torch.no_grad():
            logit = model.head(fmap)[0, 2]
        assert abs(float(heatmap.mean()) - float(logit)) < 1e-4 * (1 + abs(float(logit)))


def test_heads_without_a_map_are_refused_in_one_line(tmp_path: Path) -> None:
    make_slide(tmp_path / "slide.tif")
    split = make_checkpoint(tmp_path / "split.pt", stream_layers="stage3")
    with pytest.raises(HeatmapError, match="starts with pooling"):
        compute_heatmap(tmp_path / "slide.tif", split, tmp_path / "map.tif")
    runner = CliRunner()
    done = runner.invoke(app, ["heatmap", str(tmp_path / "slide.tif"), "--checkpoint",
                               str(split), "--out", str(tmp_path / "map.tif")])
    assert done.exit_code != 0 and "Traceback" not in done.output
    assert len(done.output.strip().splitlines()) == 1, done.output
    assert not (tmp_path / "map.tif").exists()


def test_geojson_outlines_the_strongest_regions_of_both_maps(tmp_path: Path) -> None:
    """heatmap --geojson: the polygons, rasterised at the map's resolution, are the map's
    pixels at or above its 95th percentile; saliency --geojson writes QuPath annotations of
    the explained class too."""
    from sstream.io.geojson import rasterise, read_polygons

    make_slide(tmp_path / "slide.tif")
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", pooling="attention",
                                 attention_hidden=8)
    result = compute_heatmap(tmp_path / "slide.tif", checkpoint, tmp_path / "map.tif",
                             tile_size=64, tissue="none", geojson=tmp_path / "map.geojson")
    heatmap, _ = read_map(result.out)
    strongest = heatmap >= np.percentile(heatmap[heatmap != 0], 95)
    back = rasterise(read_polygons(tmp_path / "map.geojson"), heatmap.shape,
                     (result.stride, result.stride))
    assert strongest.any() and (back == strongest).all()
    done = CliRunner().invoke(app, [
        "saliency", str(tmp_path / "slide.tif"), "--checkpoint", str(checkpoint), "--out",
        str(tmp_path / "saliency.tif"), "--no-overview", "--tissue", "none", "--tile-size",
        "64", "--device", "cpu", "--geojson", str(tmp_path / "saliency.geojson")])
    assert done.exit_code == 0, done.output
    features = json.loads((tmp_path / "saliency.geojson").read_text())["features"]
    assert features and all(f["properties"]["objectType"] == "annotation" and
                            f["properties"]["classification"]["name"] in
                            {"class 0", "class 1", "class 2"}
                            for f in features)
