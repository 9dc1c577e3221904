"""`sstream view`: tiles against read_region, overlays, bad requests, and the page."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sstream.io import TiffMapWriter, open_image, write_synthetic_slide
from sstream.view import TILE, make_server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 700 px synthetic slide and a float32 map that is non-zero on its left half only."""
    root = tmp_path_factory.mktemp("view")
    slide = root / "slide.tif"
    write_synthetic_slide(slide, 700, 1, seed=2, tile=128)
    values = np.zeros((700, 700), np.float32)
    values[:, :350] = np.linspace(0.1, 1.0, 350, dtype=np.float32)[None, :]
    saliency = root / "map.tif"
    with TiffMapWriter(saliency, (700, 700), np.float32, tile_size=128,
                       description=json.dumps({"encoding": "float32"})) as writer:
        writer.write_band(0, values)
    server = make_server(slide, overlays=[saliency], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, slide
    server.shutdown()
    server.server_close()
    server.source.close()


def get(server, path: str) -> bytes:
    host, port = server.server_address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as response:
        return response.read()


def status(server, path: str) -> int:
    try:
        get(server, path)
    except urllib.error.HTTPError as error:
        return error.code
    return 200


def test_slide_tiles_are_the_slide_at_every_level_and_edge(served):
    server, slide_path = served
    config = json.loads(get(server, "/config.json"))
    assert (config["width"], config["height"], config["maxLevel"]) == (700, 700, 10)
    assert config["mpp"] == 0.5 and config["overlays"][0]["name"] == "map.tif"
    with open_image(slide_path) as slide:
        for level, x, y in ((10, 0, 0), (10, 2, 2), (9, 1, 1), (8, 0, 0), (7, 0, 0), (5, 0, 0)):
            downsample = 2 ** (10 - level)
            data = get(server, f"/tiles/slide/{level}/{x}_{y}.jpg")
            tile = np.asarray(Image.open(io.BytesIO(data)))
            side = -(-700 // downsample)
            expected_shape = (min(TILE, side - y * TILE), min(TILE, side - x * TILE), 3)
            assert tile.shape == expected_shape  # edge tiles are partial
            # read_region at the finest pyramid level not finer than the view's, reduced
            source = slide.get_best_level_for_downsample(downsample)
            factor = downsample // round(slide.level_downsamples[source])
            full = slide.read_region((x * TILE * downsample, y * TILE * downsample), source,
                                     (expected_shape[1] * factor, expected_shape[0] * factor))
            reduced = Image.fromarray(full).reduce(factor) if factor > 1 else \
                Image.fromarray(full)
            encoded = io.BytesIO()
            reduced.save(encoded, format="JPEG", quality=90)  # the same pixels, encoded
            assert np.array_equal(tile, np.asarray(Image.open(encoded))), (level, x, y)


def test_overlay_tiles_are_drawn_where_the_map_is_non_zero(served):
    server, _ = served
    tile = np.asarray(Image.open(io.BytesIO(get(server, "/tiles/overlay0/10/1_0.png"))))
    assert tile.shape == (256, 256, 4)
    left, right = tile[:, : 350 - 256], tile[:, 350 - 256 + 2:]
    assert left[..., 3].min() > 0 and right[..., 3].max() == 0
    assert left[:, -1, 3].mean() > left[:, 0, 3].mean()  # opacity rises with the value


@pytest.mark.parametrize("path, code", [
    ("/tiles/slide/11/0_0.jpg", 400), ("/tiles/slide/10/3_0.jpg", 400),
    ("/tiles/slide/10/-1_0.jpg", 400), ("/tiles/nothing/10/0_0.png", 404),
    ("/tiles/slide/10/0_0.png", 404), ("/tiles/slide/ten/0_0.jpg", 400),
    ("/static/../../etc/passwd", 404), ("/static/%2e%2e/view.py", 404),
    ("/../sstream/view.py", 404), ("/static/images/../../view.py", 404),
])
def test_bad_requests_get_4xx(served, path, code):
    assert status(served[0], path) == code


def test_the_page_and_its_viewer_are_served_from_the_package(served):
    server, _ = served
    page = get(server, "/").decode()
    assert "/static/openseadragon.min.js" in page and "opacity" in page
    assert b"OpenSeadragon" in get(server, "/static/openseadragon.min.js")
    assert get(server, "/static/images/zoomin_rest.png").startswith(b"\x89PNG")


def test_a_map_of_another_slide_is_refused(served, tmp_path):
    _, slide_path = served
    other = tmp_path / "other.tif"
    with TiffMapWriter(other, (100, 300), np.float32, tile_size=64) as writer:
        writer.write_band(0, np.ones((100, 300), np.float32))
    with pytest.raises(ValueError, match="does not overlay"):
        make_server(slide_path, overlays=[other], port=0)


def _browser():
    """Headless Debian Chromium through Selenium, or a skip saying what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium: apt-get install chromium chromium-driver (make browser)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--window-size=900,700", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_browser_draws_the_overlay_where_the_map_is_non_zero(served):
    """The page in headless Chromium: once every tile is in, the overlay changes the left
    half of the slide (where the map is non-zero) and leaves the right half as it is
    (compared with the overlay hidden by its toggle)."""
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = served
    host, port = server.server_address[:2]
    browser = _browser()
    try:
        browser.get(f"http://{host}:{port}/")
        loaded = ("const v = window.sstreamViewer; return !!v && v.world.getItemCount() == 2 "
                  "&& [0, 1].every(i => v.world.getItemAt(i).getFullyLoaded());")
        WebDriverWait(browser, 60, 0.25).until(lambda b: b.execute_script(loaded))
        box = browser.execute_script(
            "const v = window.sstreamViewer, e = document.getElementById('viewer');"
            "const a = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));"
            "const b = v.viewport.imageToViewerElementCoordinates("
            "  new OpenSeadragon.Point(700, 700));"
            "return [a.x + e.offsetLeft, a.y + e.offsetTop, b.x + e.offsetLeft,"
            "        b.y + e.offsetTop, window.devicePixelRatio];")

        def shot() -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png()))
                              .convert("RGB")).astype(int)

        with_overlay = shot()
        browser.find_element("id", "show").click()
        WebDriverWait(browser, 10, 0.25).until(lambda b: b.execute_script(
            "return window.sstreamViewer.world.getItemAt(1).getOpacity() == 0;"))
        browser.execute_script("window.sstreamViewer.forceRedraw();")
        WebDriverWait(browser, 10, 0.25).until(lambda b: b.execute_script(
            "return !window.sstreamViewer.world.needsDraw();"))
        without = shot()
    finally:
        browser.quit()
    x0, y0, x1, y1, ratio = box
    x0, y0, x1, y1 = (round(v * ratio) for v in (x0, y0, x1, y1))
    middle, margin = (x0 + x1) // 2, (x1 - x0) // 20
    rows = slice(y0 + margin, y1 - margin)
    left = np.abs(with_overlay[rows, x0 + margin:middle - margin] -
                  without[rows, x0 + margin:middle - margin]).mean()
    right = np.abs(with_overlay[rows, middle + margin:x1 - margin] -
                   without[rows, middle + margin:x1 - margin]).mean()
    assert x1 - x0 > 200, box  # the slide fills the viewer
    assert left > 20 and right < 1, (left, right)


def test_the_tissue_outline_is_a_pixel_wide_at_every_zoom(served, tmp_path):
    """With --tissue PATH the outline layer marks the mask's border (a square here), one
    tile pixel wide whatever the level, and nothing inside or outside it."""
    _, slide_path = served
    mask = np.zeros((70, 70), np.uint8)
    mask[20:50, 10:40] = 255  # level-0 box x 100..400, y 200..500
    Image.fromarray(mask).save(tmp_path / "mask.png")
    server = make_server(slide_path, port=0, tissue=str(tmp_path / "mask.png"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert json.loads(get(server, "/config.json"))["tissue"] is True
        for level, downsample in ((10, 1), (9, 2), (8, 4)):
            tile = np.asarray(Image.open(io.BytesIO(get(server,
                                                        f"/tiles/tissue/{level}/0_0.png"))))
            drawn = tile[..., 3] > 0
            top, left = -(-200 // downsample), -(-100 // downsample)
            bottom = min(tile.shape[0], 500 // downsample) - 1
            right = min(tile.shape[1], 400 // downsample) - 1
            assert drawn[top, left + 3] and drawn[top + 3, left]  # on the border
            assert not drawn[top + 3, left + 3] and not drawn[top - 2, left + 3]
            if bottom < tile.shape[0] - 1:
                assert drawn[bottom, left + 3] and not drawn[bottom - 2, left + 3]
            if right < tile.shape[1] - 1:
                assert drawn[top + 3, right]
            assert drawn.sum() < 4 * max(tile.shape)  # a line, not an area
    finally:
        server.shutdown()
        server.server_close()
        server.source.close()
    assert status(served[0], "/tiles/tissue/10/0_0.png") == 404  # no mask asked for there


def test_several_overlays_are_served_side_by_side(served, tmp_path):
    """Two maps (say, two classes): two menu entries, each with its own tiles and scale."""
    _, slide_path = served
    maps = []
    for index, value in enumerate((1.0, 4.0)):
        path = tmp_path / f"class{index}.tif"
        with TiffMapWriter(path, (700, 700), np.float32, tile_size=128) as writer:
            band = np.zeros((700, 700), np.float32)
            band[:350 if index == 0 else 700, 350:] = value  # class 1 covers more
            writer.write_band(0, band)
        maps.append(path)
    server = make_server(slide_path, overlays=maps, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        overlays = json.loads(get(server, "/config.json"))["overlays"]
        assert [o["name"] for o in overlays] == ["class0.tif", "class1.tif"]
        assert [o["scale"] for o in overlays] == pytest.approx([1.0, 4.0])
        tiles = [np.asarray(Image.open(io.BytesIO(get(server, f"/tiles/overlay{i}/9/0_0.png"))))
                 for i in (0, 1)]
        assert (tiles[0][..., 3] > 0).sum() < (tiles[1][..., 3] > 0).sum()
    finally:
        server.shutdown()
        server.server_close()
        server.source.close()


def test_the_view_command_serves_its_options_until_interrupted(served, monkeypatch):
    """`sstream view` hands its options to make_server (a ViewConfig) and stops on Ctrl-C."""
    from http.server import ThreadingHTTPServer

    from typer.testing import CliRunner

    from sstream.cli import app

    _, slide = served
    seen = {}

    def interrupted(server):
        seen["overlays"] = [layer.name for layer in server.source.layers]
        seen["tissue"] = server.source.tissue is not None
        raise KeyboardInterrupt

    monkeypatch.setattr(ThreadingHTTPServer, "serve_forever", interrupted)
    result = CliRunner().invoke(app, ["view", str(slide), "--overlay",
                                      str(slide.with_name("map.tif")), "--port", "0",
                                      "--tissue", "AUTO"])
    assert result.exit_code == 0, result.output
    assert "viewing slide.tif at http://127.0.0.1:" in result.output and "stopped" in result.output
    assert seen == {"overlays": ["slide", "overlay0"], "tissue": True}
