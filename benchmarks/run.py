"""`make bench` / `make bench-quick`: run every benchmark module, print tables, write JSON.

Each `benchmarks/bench_*.py` module has `run(quick: bool) -> dict` returning
`{"title": str, "columns": [str, ...], "rows": [[...], ...], "notes": [str, ...]}` (notes
optional). Results go to `benchmarks/results/latest.json` (and are printed as rich tables).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def machine() -> str:
    import os

    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")


def render(result: dict, console: Console) -> None:
    table = Table(title=result["title"])
    for column in result["columns"]:
        table.add_column(str(column))
    for row in result["rows"]:
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"  {note}")


def standalone(run) -> None:
    """`python -m benchmarks.bench_x [--quick]`: run one module and print its table."""
    render(run(quick="--quick" in sys.argv), Console())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--only", nargs="*", help="run only these modules (e.g. bench_io)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    console = Console()
    names = args.only or sorted(p.stem for p in HERE.glob("bench_*.py"))
    report = {"machine": machine(), "quick": args.quick, "started": time.ctime(), "results": {}}
    console.print(f"[bold]sstream benchmarks[/bold] on {report['machine']}")
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        began = time.perf_counter()
        result = module.run(quick=args.quick)
        result["seconds"] = round(time.perf_counter() - began, 1)
        report["results"][name] = result
        render(result, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(args.out)
    console.print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
