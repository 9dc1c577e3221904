"""`sstream view`: a slide and its saliency maps in the browser, at any zoom.

A small HTTP server (the standard library's) serves one page with the OpenSeadragon viewer
shipped in `sstream/viewer/` (nothing is fetched at run time) and cuts tiles on demand from
the pyramidal TIFFs through `sstream.io`: no tile folders are written. The viewer's levels
are powers of two; level L of N shows the image at 1 / 2**(N - L), and each tile is read
from the finest pyramid level not finer than needed, then box-filtered.

Endpoints (nothing else is served, so no path reaches the file system):
    /                                   the page
    /config.json                        sizes, mpp, overlays (name, scale, encoding)
    /static/<name>                      the viewer's script and button images (a fixed list)
    /tiles/<layer>/<level>/<x>_<y>.<ext> slide tiles (JPEG), overlay tiles (PNG, RGBA)

With `tissue` ("auto": found on the thumbnail as the jobs find it, or a mask file), a
`tissue` layer draws the mask's outline, one screen pixel wide at every zoom.

Overlays are saliency maps (`sstream saliency`): uint8 maps are shown on the scale their
description records; float maps are scaled by the 99.5th percentile of the non-zero |values|
of their coarsest level. Colours: inferno, opacity rising with the value. A map placed by
physical size: one read at another resolution than level 0 (a level, or `--mpp`) covers the
slide by its µm per pixel (its record's `mpp`) where both state one, else by its aspect.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sstream.errors import InputError
from sstream.io import ImageReadError, open_image
from sstream.io.colormap import inferno
from sstream.io.tissue import TissueMask, detect_tissue, read_tissue_mask
from sstream.options import Options, option

TILE = 256
STATIC = Path(__file__).resolve().parent / "viewer"
CACHE_TILES = 1024  # ~200 MB at most of encoded tiles
FLOAT_PERCENTILE = 99.5
OUTLINE = (40, 230, 90, 255)  # RGBA of the tissue outline


@dataclass
class Layer:
    """One image the viewer shows: the slide or an overlay (a saliency map)."""

    name: str
    path: Path
    width: int
    height: int
    scale: float = 1.0       # overlay: the value shown at full colour
    signed: bool = False     # overlay: uint8 with 128 = 0
    encoding: str = "rgb"    # rgb (the slide), uint8 or float32 (maps)
    mpp: float | None = None  # overlay: µm per map pixel, where its record says
    per_slide_pixel: tuple[float, float] = (1.0, 1.0)  # overlay: map pixels per slide pixel


class TileSource:
    """Tiles of the slide and of its overlays, cut on demand and cached within a bound."""

    def __init__(self, slide: str | os.PathLike, overlays: list[str | os.PathLike] = (),
                 tissue: str | None = None):
        self.slide = open_image(slide)
        width, height = self.slide.dimensions
        self.layers = [Layer("slide", Path(slide), width, height)]
        self.tissue = _tissue_mask(self.slide, tissue)
        self._maps = {}
        for index, path in enumerate(overlays):
            layer, levels = _open_map(Path(path), f"overlay{index}")
            _place(layer, width, height, self.slide.mpp, path)
            self.layers.append(layer)
            self._maps[layer.name] = levels
        self.max_level = max(0, math.ceil(math.log2(max(width, height))))
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def config(self) -> dict:
        return {"width": self.layers[0].width, "height": self.layers[0].height,
                "tileSize": TILE, "maxLevel": self.max_level, "mpp": self.slide.mpp,
                "name": self.layers[0].path.name, "tissue": self.tissue is not None,
                "overlays": [{"name": layer.path.name, "id": layer.name, "scale": layer.scale,
                              "signed": layer.signed, "encoding": layer.encoding}
                             for layer in self.layers[1:]]}

    def tile(self, layer: str, level: int, x: int, y: int) -> bytes:
        """The encoded tile; KeyError for an unknown layer, ValueError outside the image."""
        key = (layer, level, x, y)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        found = next((lay for lay in self.layers if lay.name == layer), None)
        if layer == "tissue" and self.tissue is not None:
            found = Layer("tissue", self.layers[0].path, *self.slide.dimensions)
        if found is None:
            raise KeyError(layer)
        data = self._render(found, level, x, y)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > CACHE_TILES:
                self._cache.popitem(last=False)
        return data

    def close(self) -> None:
        self.slide.close()
        for levels in self._maps.values():
            levels.close()

    def _render(self, layer: Layer, level: int, x: int, y: int) -> bytes:
        if not 0 <= level <= self.max_level:
            raise InputError(f"level {level} outside 0..{self.max_level}")
        downsample = 2 ** (self.max_level - level)
        width = math.ceil(self.layers[0].width / downsample)
        height = math.ceil(self.layers[0].height / downsample)
        x0, y0 = x * TILE, y * TILE
        if x < 0 or y < 0 or x0 >= width or y0 >= height:
            raise InputError(f"tile {x}_{y} outside level {level} ({width} x {height})")
        size = (min(TILE, width - x0), min(TILE, height - y0))
        box = (x0 * downsample, y0 * downsample, size[0] * downsample, size[1] * downsample)
        out = io.BytesIO()
        if layer.name == "slide":
            _slide_region(self.slide, box, size).save(out, format="JPEG", quality=90)
        elif layer.name == "tissue":
            _outline_region(self.tissue, box, size).save(out, format="PNG")
        else:
            _overlay_region(self._maps[layer.name], layer, box, size,
                            self.layers[0]).save(out, format="PNG")
        return out.getvalue()


def _slide_region(slide, box: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
    """The level-0 box (x, y, w, h) as an RGB image of `size`: read at the finest pyramid
    level not finer than needed, `factor` times the size (the nearest whole ratio), and
    reduced by factor x factor boxes."""
    x, y, w, _ = box
    wanted = w / size[0]
    level = slide.get_best_level_for_downsample(wanted)
    factor = max(1, round(wanted / slide.level_downsamples[level]))
    region = slide.read_region((x, y), level, (size[0] * factor, size[1] * factor))
    image = Image.fromarray(region)
    return image.reduce(factor) if factor > 1 else image


def _tissue_mask(slide, tissue: str | None) -> TissueMask | None:
    """The mask `tissue` asks for: None for None or "none"."""
    if tissue in (None, "none"):
        return None
    if tissue == "auto":
        return detect_tissue(slide)
    if not Path(tissue).is_file():
        raise InputError(f"--tissue must be auto, none or a mask image file; {tissue!r} is "
                         "neither")
    return read_tissue_mask(tissue, slide)


def _outline_region(tissue: TissueMask, box: tuple[int, int, int, int],
                    size: tuple[int, int]) -> Image.Image:
    """RGBA: the tissue's outline in the box, sampled at the tile's own pixels (so it is a
    pixel wide at every zoom), transparent elsewhere."""
    x, y, w, h = box
    xs = x + (np.arange(size[0] + 2) - 0.5) * (w / size[0])  # a pixel beyond each side
    ys = y + (np.arange(size[1] + 2) - 0.5) * (h / size[1])
    inside = tissue.sample(xs[None, :], ys[:, None])
    core = inside[1:-1, 1:-1]
    edge = core & ~(inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:])
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    rgba[edge] = OUTLINE
    return Image.fromarray(rgba, mode="RGBA")


class _MapLevels:
    """A saliency map's pyramid levels as raw values (float32 or uint8)."""

    def __init__(self, path: Path):
        import tifffile
        import zarr

        self._tiff = tifffile.TiffFile(path)
        series = self._tiff.series[0]
        self.arrays = [zarr.open(series.aszarr(level=i), mode="r")
                       for i in range(len(series.levels))]
        self.description = self._tiff.pages.first.description
        self.dtype = series.dtype

    def close(self) -> None:
        self._tiff.close()


def _open_map(path: Path, name: str) -> tuple[Layer, _MapLevels]:
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    try:
        levels = _MapLevels(path)
    except Exception as exc:
        raise ImageReadError(path, f"not a saliency map TIFF ({exc})") from None
    height, width = levels.arrays[0].shape[:2]
    try:
        record = json.loads(levels.description or "{}")
    except json.JSONDecodeError:
        record = {}
    mpp = record.get("mpp") if isinstance(record, dict) else None
    mpp = float(mpp) if isinstance(mpp, (int, float)) and mpp > 0 else None
    if levels.dtype == np.uint8:
        signed = record.get("offset") == 128
        return Layer(name, path, width, height, 255.0, signed, "uint8", mpp), levels
    coarsest = np.abs(np.asarray(levels.arrays[-1][:], dtype=np.float64))
    nonzero = coarsest[coarsest > 0]
    scale = float(np.percentile(nonzero, FLOAT_PERCENTILE)) if nonzero.size else 1.0
    return Layer(name, path, width, height, scale or 1.0, False, "float32", mpp), levels


def _place(layer: Layer, width: int, height: int, slide_mpp: float | None, path: Path
           ) -> None:
    """Set how the map covers the width x height slide: by physical size where the map
    and the slide state their µm per pixel, else by width. ValueError where it does not
    cover the slide (a side more than 1% or a pixel apart)."""
    per = slide_mpp / layer.mpp if layer.mpp is not None and slide_mpp is not None else \
        layer.width / width
    layer.per_slide_pixel = (per, per)
    for side, slide_side, per in ((layer.width, width, layer.per_slide_pixel[0]),
                                  (layer.height, height, layer.per_slide_pixel[1])):
        if abs(side - slide_side * per) > max(1.0, 0.01 * side):
            raise InputError(f"{path}: a {layer.width} x {layer.height} map does not "
                             f"overlay a {width} x {height} slide")


def _overlay_region(levels: _MapLevels, layer: Layer, box: tuple[int, int, int, int],
                    size: tuple[int, int], slide: Layer) -> Image.Image:
    """RGBA overlay of the box: inferno colours, opacity rising with |value| / scale."""
    x, y, w, h = box
    fx, fy = layer.per_slide_pixel
    full_h, full_w = levels.arrays[0].shape[:2]
    pick = 0
    for index, array in enumerate(levels.arrays):  # coarsest level still fine enough
        if array.shape[1] and full_w / array.shape[1] <= w * fx / size[0] * 1.01:
            pick = index
    array = levels.arrays[pick]
    ds = full_w / array.shape[1]
    x0, y0 = int(x * fx / ds), int(y * fy / ds)
    x1 = min(array.shape[1], max(x0 + 1, math.ceil((x + w) * fx / ds)))
    y1 = min(array.shape[0], max(y0 + 1, math.ceil((y + h) * fy / ds)))
    values = np.asarray(array[y0:y1, x0:x1], dtype=np.float64)
    if layer.encoding == "uint8":
        values = np.abs(values - 128) / 127 if layer.signed else values / 255
    else:
        values = np.abs(values) / layer.scale
    t = np.clip(values, 0, 1)
    rgba = np.concatenate([inferno(t), (np.sqrt(t) * 255).astype(np.uint8)[..., None]], -1)
    image = Image.fromarray(rgba, mode="RGBA")
    return image.resize(size, Image.Resampling.NEAREST if image.size[0] < size[0]
                        else Image.Resampling.BOX)


# ---- the server -----------------------------------------------------------------------------


def _static_files() -> dict[str, Path]:
    """The only files /static/ serves, by name."""
    files = {"openseadragon.min.js": STATIC / "openseadragon.min.js"}
    files.update({f"images/{p.name}": p for p in (STATIC / "images").glob("*.png")})
    return files


_TYPES = {".js": "text/javascript", ".png": "image/png", ".jpg": "image/jpeg",
          ".html": "text/html; charset=utf-8", ".json": "application/json"}


class _Handler(BaseHTTPRequestHandler):
    source: TileSource
    static: dict[str, Path]

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                return self._send((STATIC / "index.html").read_bytes(), ".html")
            if path == "/config.json":
                return self._send(json.dumps(self.source.config()).encode(), ".json")
            if path.startswith("/static/") and path[len("/static/"):] in self.static:
                file = self.static[path[len("/static/"):]]
                return self._send(file.read_bytes(), file.suffix)
            if path.startswith("/tiles/"):
                return self._tile(path[len("/tiles/"):])
        except (BrokenPipeError, ConnectionResetError):
            return None
        self.send_error(HTTPStatus.NOT_FOUND)
        return None

    def _tile(self, rest: str) -> None:
        parts = rest.split("/")
        try:
            layer, level, name = parts
            stem, ext = name.rsplit(".", 1)
            x, y = (int(v) for v in stem.split("_"))
            data = self.source.tile(layer, int(level), x, y)
        except KeyError:
            return self.send_error(HTTPStatus.NOT_FOUND, "no such layer")
        except ValueError as exc:
            return self.send_error(HTTPStatus.BAD_REQUEST, str(exc).splitlines()[0][:200])
        expected = "jpg" if layer == "slide" else "png"  # overlays and the tissue outline
        if ext != expected:
            return self.send_error(HTTPStatus.NOT_FOUND)
        return self._send(data, "." + ext)

    def _send(self, data: bytes, suffix: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", _TYPES[suffix])
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "max-age=3600")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Quiet: a viewer asks for hundreds of tiles."""


@dataclass
class ViewConfig(Options):
    """The options of `sstream view` (`make_server`): what is drawn over the slide, and where
    the viewer is served."""

    overlays: list[str] = option(help="Saliency map (pyramidal TIFF from sstream saliency) to "
                                 "overlay; repeatable.", factory=list)
    port: int = option(8000, "Port (0: any free one).")
    host: str = option("127.0.0.1", "Address to listen on (default: this machine only; reach "
                       "it over SSH with ssh -L).")
    tissue: str = option("none", "Outline the tissue: auto (found as the jobs find it), a mask "
                         "image, or none.")

    def validate(self) -> None:
        """InputError for a port no socket has (the slide, maps and mask are checked as they
        are opened)."""
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in 0..65535, got {self.port}")


def make_server(slide: str | os.PathLike, config: ViewConfig | None = None,
                **options: Any) -> ThreadingHTTPServer:
    """A server for the slide, its overlays and (`tissue`: "auto" or a mask file) its tissue
    outline; not started: call `serve_forever()`, and `server_close()` then
    `server.source.close()` when done. Port 0 picks a free one. Options come as a
    `ViewConfig`, by name (`make_server(slide, overlays=[map_tif], port=0)`), or both.

    Raises:
        ImageReadError: the slide or a map cannot be read. InputError: a map of another
            size, a tissue that is neither a choice nor a file. OSError: the port is taken.
    """
    config = ViewConfig.given(config, options)
    config.validate()
    source = TileSource(slide, list(config.overlays), config.tissue)
    handler = type("Handler", (_Handler,), {"source": source, "static": _static_files()})
    try:
        server = ThreadingHTTPServer((config.host, config.port), handler)
    except OSError:
        source.close()
        raise
    server.daemon_threads = True
    server.source = source
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
