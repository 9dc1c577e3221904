"""The README's screenshot of `sstream view` on the demo's saliency map (after `make demo`):
headless Debian Chromium through Selenium, once every tile is in.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/figures/viewer.png")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    rows = list(csv.DictReader(open(ROOT / "sample_data/val.csv")))
    slide = ROOT / "sample_data" / next(r["image"] for r in rows if r["label"] == "1")
    server = make_server(slide, [ROOT / "demo_output/saliency.tif"], port=0)
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.out))
    finally:
        browser.quit()
        server.shutdown()
        server.source.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
