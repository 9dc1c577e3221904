"""GeoJSON in QuPath's terms: maps out as polygons, annotations in as masks.

Out (`map_features`): the regions of a map (H, W) at or above a threshold, traced by
scikit-image's marching squares (`find_contours` at 0.5 on the zero-padded region mask, so
every ring closes), as Polygon Features of a FeatureCollection. A map pixel (i, j) covers
[j, j + 1) x [i, i + 1) in map coordinates; contours run through the pixel edges between a
region and the rest, cutting the corners of diagonal steps (so a region rasterised back
differs from the mask by at most one pixel along its edges). Vertices are mapped to level-0
pixels by the caller's `level0`. Rings are closed (first vertex = last) and oriented as RFC
7946 says: exteriors counter-clockwise, holes clockwise (positive and negative shoelace area
of the coordinates as written). Each Feature carries QuPath's `objectType` ("annotation"),
`classification` {"name", "color"} and `measurements` {"peak", "mean"} of the map's values
inside it, which File > Import objects reads.

In (`read_polygons`, `rasterise`): Polygon and MultiPolygon geometries (holes included) of a
FeatureCollection, a Feature, a bare geometry or a list of Features (QuPath's exports),
rasterised by scikit-image's `draw.polygon`: exteriors filled, then their holes cleared, larger
polygons first so that an island inside another's hole is drawn after that hole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from skimage import draw, measure

from sstream.errors import InputError, first_line
from sstream.io.reader import ImageReadError

__all__ = ["DEFAULT_PERCENTILE", "map_features", "rasterise", "read_polygons",
           "signed_area", "threshold_at", "write_geojson"]

DEFAULT_PERCENTILE = 95.0  # regions above the 95th percentile of the map's non-zero values

Level0 = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Maps map coordinates (y, x) (float arrays) to level-0 pixels (y, x)."""

Polygon = list[np.ndarray]
"""An exterior ring then its holes, each (n, 2) vertices (x, y), closed."""


def threshold_at(values: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The `percentile` of the map's non-zero values (zeros lie off the tissue), or 0."""
    nonzero = values[values != 0]
    return float(np.percentile(nonzero, percentile)) if nonzero.size else 0.0


def signed_area(ring: np.ndarray) -> float:
    """The shoelace area of a ring (n, 2) of (x, y): positive when counter-clockwise with
    x to the right and y up (RFC 7946's exterior), negative when clockwise."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def mask_polygons(mask: np.ndarray) -> list[Polygon]:
    """The polygons (exterior, *holes) outlining a bool mask's regions, in map
    coordinates (module docstring), oriented as RFC 7946 says."""
    padded = np.pad(mask.astype(np.float32), 1)
    rings = [contour[:, ::-1] - 0.5 for contour in  # padded (row, col) -> map (x, y)
             measure.find_contours(padded, 0.5, positive_orientation="high")]
    # around the regions (high) the contours turn one way, around holes the other
    exteriors = [r for r in rings if signed_area(r) < 0]
    holes = [r for r in rings if signed_area(r) > 0]
    polygons: list[Polygon] = [[_oriented(r, exterior=True)] for r in exteriors]
    areas = [abs(signed_area(r)) for r in exteriors]
    for hole in holes:
        inside = [k for k, r in enumerate(exteriors)
                  if measure.points_in_poly(hole[:1], r)[0]]
        if inside:  # the smallest exterior around it
            polygons[min(inside, key=areas.__getitem__)].append(_oriented(hole, False))
    return polygons


def _oriented(ring: np.ndarray, exterior: bool) -> np.ndarray:
    if (signed_area(ring) > 0) != exterior:
        ring = ring[::-1]
    return ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def map_features(values: np.ndarray, threshold: float, level0: Level0, name: str,
                 colour: tuple[int, int, int] = (255, 64, 0)) -> dict[str, Any]:
    """A FeatureCollection of the regions where `values` (H, W) >= `threshold` (module
    docstring), vertices in level-0 pixels through `level0`."""
    features = []
    above = values >= threshold
    for polygon in mask_polygons(above):
        region = _inside(polygon, values, above)
        if not region.size:  # a sliver thinner than a pixel centre
            continue
        rings = []
        for ring in polygon:
            ys, xs = level0(ring[:, 1], ring[:, 0])
            rings.append(np.stack([xs, ys], axis=1).round(3).tolist())
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation",
                           "classification": {"name": name, "color": list(colour)},
                           "measurements": {"peak": float(region.max()),
                                            "mean": float(region.mean())}}})
    return {"type": "FeatureCollection", "features": features}


def _inside(polygon: Polygon, values: np.ndarray, above: np.ndarray) -> np.ndarray:
    """The values above the threshold inside the polygon, rasterised over its bounding box
    only (a map may hold thousands of regions)."""
    x0, y0 = np.floor(polygon[0].min(axis=0)).astype(int)
    x1, y1 = np.ceil(polygon[0].max(axis=0)).astype(int)
    shifted = [ring - (x0, y0) for ring in polygon]
    inside = rasterise([shifted], (y1 - y0, x1 - x0)) & above[y0:y1, x0:x1]
    return values[y0:y1, x0:x1][inside]


def write_geojson(path: str | Path, collection: dict[str, Any]) -> None:
    """Write the collection as JSON (atomically: a temporary sibling renamed)."""
    from sstream.io.atomic import atomic_output

    with atomic_output(Path(path), overwrite=True) as temporary:
        Path(temporary).write_text(json.dumps(collection))


def read_polygons(path: str | Path) -> list[Polygon]:
    """The Polygon and MultiPolygon geometries of a GeoJSON file (module docstring), as
    polygons of (n, 2) float arrays (x, y). ImageReadError in one line for a file that is
    not JSON, holds no polygon, or has a malformed one."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageReadError(path, f"not a GeoJSON file ({first_line(exc)})") from None
    polygons: list[Polygon] = []
    try:
        for geometry in _geometries(document):
            kind, coordinates = geometry.get("type"), geometry.get("coordinates")
            if kind == "Polygon":
                polygons.append(_polygon(coordinates))
            elif kind == "MultiPolygon":
                polygons.extend(_polygon(p) for p in coordinates)
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ImageReadError(path, f"a malformed GeoJSON polygon ({first_line(exc)})") \
            from None
    if not polygons:
        raise ImageReadError(path, "the GeoJSON holds no Polygon or MultiPolygon")
    return polygons


def _geometries(document: Any) -> Iterable[dict[str, Any]]:
    """Every geometry of a FeatureCollection, Feature, geometry or list of them."""
    if isinstance(document, list):
        for item in document:
            yield from _geometries(item)
    elif not isinstance(document, dict):
        raise InputError(f"expected a GeoJSON object, got {type(document).__name__}")
    elif document.get("type") == "FeatureCollection":
        yield from _geometries(document.get("features", []))
    elif document.get("type") == "Feature":
        if document.get("geometry") is not None:
            yield from _geometries(document["geometry"])
    elif document.get("type") == "GeometryCollection":
        yield from _geometries(document.get("geometries", []))
    else:
        yield document


def _polygon(coordinates: Any) -> Polygon:
    rings = [np.asarray(ring, dtype=np.float64)[:, :2] for ring in coordinates]
    if not rings or any(ring.ndim != 2 or len(ring) < 3 for ring in rings):
        raise InputError("a polygon's rings need three or more [x, y] positions")
    if not all(np.isfinite(ring).all() for ring in rings):
        raise InputError("a coordinate is not a finite number")
    return rings


def rasterise(polygons: list[Polygon], shape: tuple[int, int],
              scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """A bool mask (H, W) of the polygons (module docstring); `scale` (sx, sy): polygon
    units per mask pixel. Pixel (i, j) is inside where its centre (j + 0.5, i + 0.5) is
    (scikit-image's `draw.polygon`, whose pixel centres are at integers)."""
    mask = np.zeros(shape, dtype=bool)
    by_area = sorted(polygons, key=lambda p: -abs(signed_area(p[0])))
    for polygon in by_area:
        for k, ring in enumerate(polygon):
            points = ring / np.asarray(scale) - 0.5  # mask pixel centres at integers
            rows, cols = draw.polygon(points[:, 1], points[:, 0], shape)
            mask[rows, cols] = k == 0  # the exterior filled, its holes cleared
    return mask


