"""Does full resolution matter? The paper's CAMELYON17 and TUPAC16 tables, on synthetic
slides.

Generates synthetic slides whose label lives in small textured lesions (`sstream
make-sample-data`: decoys of the same mean colour make any 4x downsample ambiguous), then
trains the same model (a) streamed at full resolution and (b) on the image downsampled 4x and
8x (pyramid levels 2 and 3), with the same seed, schedule and number of epochs, and reports
the validation metrics of each, as the paper does for 4 MP vs 66 MP inputs:

- `--task classification` (CAMELYON17): label 1 = the slide has lesions; AUC and accuracy.
- `--task regression` (TUPAC16's proliferation score): every slide has 1-3 lesions and the
  label is their texture contrast in [0, 1] (`make-sample-data --regression`), which a 4x
  downsample erases with the texture; Spearman, as the paper reports.

    python benchmarks/resolution.py [--task classification|regression] [--count 48]
        [--size 2048] [--epochs 8] [--out DIR]

Writes a rich table and `results.json` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sstream.io import make_sample_data  # noqa: E402
from sstream.train import TrainConfig, train  # noqa: E402

SETTINGS = [("full resolution (streamed)", 0), ("downsampled 4x", 2), ("downsampled 8x", 3)]


def _finite(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["classification", "regression"],
                        default="classification")
    parser.add_argument("--count", type=int, default=48, help="slides (train + val)")
    parser.add_argument("--size", type=int, default=2048,
                        help="slide side in pixels (>= 2048 so that an 8x level exists)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/resolution[_regression]")
    args = parser.parse_args()
    regression = args.task == "regression"
    args.out = args.out or Path("benchmarks/results/resolution" +
                                ("_regression" if regression else ""))
    primary = "val_spearman" if regression else "val_auc"
    console = Console()
    data = args.out / "data"
    if not (data / "train.csv").exists():
        console.print(f"generating {args.count} slides of {args.size} px in {data}")
        make_sample_data(data, args.count, args.size, seed=args.seed + 7, val_fraction=0.33,
                         regression=regression)
    rows = []
    for name, level in SETTINGS:
        began = time.perf_counter()
        result = train(TrainConfig(
            train_csv=str(data / "train.csv"), val_csv=str(data / "val.csv"),
            out=str(args.out / f"level{level}"), model=args.model, level=level,
            epochs=args.epochs, lr=3e-3, accumulate=2, tile_size=args.tile_size,
            seed=args.seed, device="auto", task=args.task), overwrite=True)
        best = max(result.state.history, key=lambda r: (_finite(r.get(primary)),
                                                        _finite(r.get("val_accuracy"))))
        last = result.state.history[-1]
        finals = (["val_spearman", "val_pearson", "val_mae"] if regression
                  else ["val_auc", "val_accuracy"])
        rows.append({"setting": name, "level": level, "input_px": args.size // 2**level,
                     f"best_{primary}": best.get(primary),
                     **{f"final_{key}": last.get(key) for key in finals},
                     "minutes": round((time.perf_counter() - began) / 60, 1)})
        console.print(rows[-1])
    table = Table(title=f"{args.task}: validation metrics, {args.model}, {args.count} "
                        f"synthetic slides of "
                        f"{args.size} px, {args.epochs} epochs")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()])
    console.print(table)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
