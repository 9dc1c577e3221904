"""GeoJSON out and in (sstream.io.geojson): masks traced to QuPath polygons and rasterised
back, RFC 7946 rings, measurements, annotations as tissue masks, and bad files in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndimage
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sstream.cli import app
from sstream.io import ImageReadError, open_image
from sstream.io.geojson import (
    map_features,
    rasterise,
    read_polygons,
    signed_area,
    threshold_at,
    write_geojson,
)
from sstream.io.tissue import read_tissue_mask

SCALE = 4.0  # level-0 pixels per map pixel in the round trips


def to_level0(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return y * SCALE, x * SCALE


def round_trip(values: np.ndarray, threshold: float, path: Path) -> tuple[dict, np.ndarray]:
    collection = map_features(values, threshold, to_level0, "tumor")
    write_geojson(path, collection)
    if not collection["features"]:  # nothing above the threshold: an empty collection
        return json.loads(path.read_text()), np.zeros(values.shape, bool)
    back = rasterise(read_polygons(path), values.shape, (SCALE, SCALE))
    return json.loads(path.read_text()), back


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 24), width=st.integers(1, 24), seed=st.integers(0, 2**16),
       density=st.floats(0.2, 0.8))
def test_a_mask_survives_geojson_and_rasterisation(tmp_path_factory, height, width, seed,
                                                   density):
    """Random masks with holes and islands in holes: the rasterised polygons differ from the
    mask only on pixels along its edges (here, in fact, nowhere), every ring is closed,
    exteriors counter-clockwise and holes clockwise, and each feature measures its region."""
    rng = np.random.default_rng(seed)
    values = rng.random((height, width)) * (rng.random((height, width)) < density)
    mask = values >= 0.3
    path = tmp_path_factory.mktemp("geojson") / "regions.geojson"
    document, back = round_trip(values, 0.3, path)
    edges = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    assert not ((back != mask) & ~edges).any()
    assert (back == mask).all()
    assert document["type"] == "FeatureCollection"
    for feature in document["features"]:
        rings = [np.asarray(r) for r in feature["geometry"]["coordinates"]]
        assert all(np.array_equal(r[0], r[-1]) and len(r) >= 4 for r in rings)
        assert signed_area(rings[0]) > 0 and all(signed_area(r) < 0 for r in rings[1:])
        inside = rasterise([rings], values.shape, (SCALE, SCALE)) & mask
        properties = feature["properties"]
        assert properties["classification"]["name"] == "tumor"
        assert properties["measurements"]["peak"] == pytest.approx(values[inside].max())
        assert properties["measurements"]["mean"] == pytest.approx(values[inside].mean())


def test_a_hole_with_an_island_is_one_polygon_with_a_hole_and_one_without(tmp_path):
    mask = np.zeros((12, 12))
    mask[1:11, 1:11] = 1
    mask[3:9, 3:9] = 0
    mask[5:7, 5:7] = 1
    document, back = round_trip(mask, 0.5, tmp_path / "ring.geojson")
    rings = sorted(len(f["geometry"]["coordinates"]) for f in document["features"])
    assert rings == [1, 2] and (back == (mask > 0)).all()
    assert threshold_at(np.array([0.0, 1.0, 2.0, 3.0]), 50) == 2.0  # zeros do not count


def slide(path: Path, size: tuple[int, int] = (96, 160)) -> Path:
    rgb = np.full((*size, 3), 240, np.uint8)
    tifffile.imwrite(path, rgb, tile=(32, 32))
    return path


def test_qupath_annotations_with_holes_are_a_tissue_mask(tmp_path):
    """A Feature list as QuPath exports it: a square with a hole, and a MultiPolygon."""
    square = [[[16, 16], [80, 16], [80, 80], [16, 80], [16, 16]],
              [[32, 32], [32, 64], [64, 64], [64, 32], [32, 32]]]
    triangle = [[[100, 10], [150, 10], [125, 60], [100, 10]]]
    features = [{"type": "Feature", "properties": {"objectType": "annotation"},
                 "geometry": {"type": "Polygon", "coordinates": square}},
                {"type": "Feature", "properties": {},
                 "geometry": {"type": "MultiPolygon", "coordinates": [triangle]}}]
    (tmp_path / "tissue.geojson").write_text(json.dumps(features))
    with open_image(slide(tmp_path / "slide.tif")) as image:
        tissue = read_tissue_mask(tmp_path / "tissue.geojson", image)
    xs = np.array([20.5, 48.5, 70.5, 125.5, 125.5, 90.5])
    ys = np.array([20.5, 48.5, 70.5, 20.5, 70.5, 50.5])
    assert tissue.sample(xs, ys).tolist() == [True, False, True, True, False, False]


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "not a GeoJSON file"),
    ('{"type": "FeatureCollection", "features": []}', "holds no Polygon"),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [1, "a"]]]}', "malformed GeoJSON"),
    ('{"type": "Polygon", "coordinates": 3}', "malformed GeoJSON"),
    ("[1, 2]", "malformed GeoJSON"),
])
def test_a_bad_geojson_gets_one_line(tmp_path, content, says):
    bad = tmp_path / "bad.geojson"
    bad.write_text(content)
    with pytest.raises(ImageReadError, match=says):
        read_polygons(bad)
    done = CliRunner().invoke(app, ["tissue", str(slide(tmp_path / "slide.tif")), "--tissue",
                                    str(bad), "--out", str(tmp_path / "preview.png")])
    assert done.exit_code != 0 and "Traceback" not in done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "bad.geojson" in lines[0], done.output
    assert not (tmp_path / "preview.png").exists()
