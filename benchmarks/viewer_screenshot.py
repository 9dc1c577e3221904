"""The usage guide's screenshot (docs/usage.md) of `sstream view` on the demo's saliency map
(after `make demo`), zoomed 4x on its strongest value: headless Debian Chromium through
Selenium, once every tile is in.

    python benchmarks/viewer_screenshot.py [--out benchmarks/figures/viewer.png]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sstream.view import make_server  # noqa: E402


def _strongest(path: Path) -> tuple[float, float]:
    """Level-0 (x, y) of the largest value of the map's coarsest level."""
    import numpy as np
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        coarse = series.levels[-1].asarray()
        full_h, full_w = series.levels[0].shape[:2]
    row, col = np.unravel_index(np.argmax(np.abs(coarse)), coarse.shape[:2])
    return ((col + 0.5) * full_w / coarse.shape[1], (row + 0.5) * full_h / coarse.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/figures/viewer.png")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    rows = list(csv.DictReader(open(ROOT / "sample_data/val.csv")))
    slide = ROOT / "sample_data" / next(r["image"] for r in rows if r["label"] == "1")
    server = make_server(slide, overlays=[ROOT / "demo_output/saliency.tif"], port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1000,640"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        host, port = server.server_address[:2]
        browser.get(f"http://{host}:{port}/")
        loaded = ("const v = window.sstreamViewer; return !!v && v.world.getItemCount() == 2 "
                  "&& [0, 1].every(i => v.world.getItemAt(i).getFullyLoaded());")
        WebDriverWait(browser, 60, 0.25).until(lambda b: b.execute_script(loaded))
        x, y = _strongest(ROOT / "demo_output/saliency.tif")
        browser.execute_script(  # 4x on the strongest saliency: cells, not the slide
            f"const v = window.sstreamViewer;"
            f"const p = v.viewport.imageToViewportCoordinates(new OpenSeadragon.Point({x}, {y}));"
            f"v.viewport.zoomTo(v.viewport.getHomeZoom() * 4, p, true);"
            f"v.viewport.panTo(p, true);")
        WebDriverWait(browser, 60, 0.25).until(lambda b: b.execute_script(loaded))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.out))
    finally:
        browser.quit()
        server.shutdown()
        server.source.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
