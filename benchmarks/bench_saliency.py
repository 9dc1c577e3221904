"""Peak memory of `sstream saliency` on synthetic slides: the map is never held whole.

For each size a synthetic tiled JPEG slide (`write_synthetic_slide`, cached in the temporary
directory) is explained by a random `tiny` model in a fresh subprocess, which reports its peak
resident set size (`ru_maxrss`) before and after `compute_saliency` (float32 map + PNG
overview, tile 256, CPU). The baseline (the resident set once Python, torch and the modules
it loads for meta-device shape inference, and the model are loaded) is subtracted; the rest
is what saliency needed, compared with what the float32 map alone (4 bytes a pixel) and
the float32 input (12 bytes a pixel) would take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, time
import torch
from sstream.saliency import compute_saliency
from sstream.models import load_checkpoint
from sstream.engine import StreamingCNN
slide, checkpoint, out, tile = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = load_checkpoint(checkpoint)
# torch imports its meta-device machinery (torch._dynamo, ~150 MiB) on the first shape
# inference: part of the baseline, whatever the slide's size
StreamingCNN(model.stream, tile).plan((1, 3, 512, 512))
# the resident set now (not the high-water mark, which start-up transients can raise)
try:
    with open("/proc/self/statm") as statm:
        baseline = int(statm.read().split()[1]) * resource.getpagesize() // 1024
except OSError:  # not Linux: the high-water mark so far
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
began = time.perf_counter()
result = compute_saliency(slide, model, out, overview=out[:-4] + ".png", tile_size=tile,
                          overwrite=True)
print(json.dumps({"baseline_kb": baseline, "peak_kb":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.perf_counter() - began, "tiles": result.tiles}))
"""


def cached_slide(size: int) -> Path:
    """A synthetic slide of size x size pixels (written once, kept in the temp directory)."""
    from sstream.io import write_synthetic_slide

    folder = Path(tempfile.gettempdir()) / "sstream-bench"
    folder.mkdir(exist_ok=True)
    path = folder / f"synthetic-{size}.tif"
    if not path.exists():
        write_synthetic_slide(path, size, label=1, seed=0)
    return path


def measure(size: int, tile: int, checkpoint: Path, out_dir: Path) -> dict:
    """Run saliency on a size x size slide in a subprocess; its memory and time."""
    slide = cached_slide(size)
    out = out_dir / f"saliency-{size}.tif"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(checkpoint), str(out),
                           str(tile)], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"saliency on {slide} failed: {done.stderr.strip()[-500:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    for path in (out, out.with_suffix(".png")):
        path.unlink(missing_ok=True)
    return record


def run(quick: bool = False) -> dict:
    import torch

    from sstream.models import ModelConfig, build_model, checkpoint_payload

    sizes = [2000, 4000] if quick else [4000, 20000]
    tile = 256  # the saliency default
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "tiny.pt"
        torch.manual_seed(0)
        torch.save(checkpoint_payload(build_model(ModelConfig(name="tiny"))), checkpoint)
        for size in sizes:
            r = measure(size, tile, checkpoint, Path(tmp))
            mib = 1024 * 1024
            used = (r["peak_kb"] - r["baseline_kb"]) * 1024 / mib
            map_f32 = size * size * 4 / mib
            rows.append([f"{size} x {size}", round(size * size / 1e6, 1), r["tiles"],
                         round(r["seconds"], 1), round(r["baseline_kb"] / 1024),
                         round(r["peak_kb"] / 1024), round(used), round(map_f32),
                         round(3 * map_f32), f"{100 * used / map_f32:.0f} %"])
    return {
        "title": "saliency: peak RSS (MiB) vs the full-resolution float32 map",
        "columns": ["slide", "MP", "tiles", "seconds", "baseline RSS", "peak RSS",
                    "saliency used", "float32 map", "float32 input",
                    "used / map"],
        "rows": rows,
        "notes": [
            "tiny model, random weights, tile 256, CPU, float32 map + PNG overview; "
            "`saliency used` = peak RSS - baseline (Python, torch with the modules it loads "
            "for meta-device shape inference, the model).",
            "Nothing image-sized is held: the engine pools tile by tile (no feature map), "
            "re-runs only the tiles that hold a channel's maximum, and hands out final "
            "gradient blocks; what grows with the slide is its width: one row of map blocks "
            "(tile x width floats) and the writer's two rows of TIFF tiles.",
        ],
    }
