"""`make bench` / `make bench-quick`: run every benchmark module, print tables, write JSON
and Markdown.

Each `benchmarks/bench_*.py` module has `run(quick: bool) -> dict` returning
`{"title": str, "columns": [str, ...], "rows": [[...], ...], "notes": [str, ...]}` (notes
optional). Results go to `benchmarks/results/latest.json` and `latest.md` (`quick.json` and
`quick.md` for a quick run) and are printed as rich tables, at least WIDE columns wide when
piped to a log, so that no header or cell is cut. A full-size run also writes
docs/benchmarks.md, the dated tables the README links: the sections of the modules that ran
are replaced, the others kept (a full run of every module takes hours on a small machine, so
modules can be brought up to date a few at a time); a quick run writes only into the results
folder.
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
DOCS = HERE.parent / "docs" / "benchmarks.md"
WIDE = 200  # columns of the tables when stdout is not a terminal


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


def markdown(report: dict) -> str:
    """The report's tables as Markdown, dated, with the machine they ran on."""
    kind = "quick run (small sizes)" if report["quick"] else "full run"
    lines = ["# Benchmarks", "", f"Measured {report['started']} on {report['machine']}, "
             f"{kind}, by `benchmarks/run.py`.", ""]
    for result in report["results"].values():
        lines += _table(result)
    return "\n".join(lines)


def _table(result: dict, heading: bool = True) -> list[str]:
    lines = [f"## {result['title']}", ""] if heading else []
    lines += ["| " + " | ".join(map(str, result["columns"])) + " |",
              "|" + "---|" * len(result["columns"])]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in result["rows"]]
    lines += [""] + [f"- {note}" for note in result.get("notes", [])]
    return lines + [f"\n({result['seconds']} s)", ""]


SECTION = "<!-- benchmark: {} -->"
DOCS_HEADER = """# Benchmarks

Written by `make bench` (`benchmarks/run.py`): one section per benchmark module, each dated
with the machine it ran on. A full-size run of some modules (`python benchmarks/run.py --only
bench_read bench_io`) replaces their sections and keeps the others; `make bench-quick` writes
only into `benchmarks/results/`. Earlier measurements, each with its command, are in
[results.md](results.md).
"""


def docs_page(report: dict, previous: str, modules: list[str]) -> str:
    """docs/benchmarks.md: the sections of the modules in this full-size `report`, and the
    previous page's sections of every other module in `modules` (or a line saying that it
    has not run at full size yet)."""
    kept = _sections(previous)
    page = [DOCS_HEADER]
    for name in modules:
        if name in report["results"]:
            result = report["results"][name]
            body = [f"## {result['title']}", "", f"Measured {report['started']} on "
                    f"{report['machine']}, full size (`python benchmarks/run.py --only "
                    f"{name}`).", "", *_table(result, heading=False)]
            kept[name] = "\n".join([SECTION.format(name), "", *body]).rstrip() + "\n"
        page.append(kept.get(name) or f"{SECTION.format(name)}\n\n## {name}\n\nNot run at "
                    "full size yet.\n")
    return "\n".join(page)


def _sections(page: str) -> dict[str, str]:
    """The previous page's sections by module name (the text from a module's marker to the
    next marker)."""
    found, current = {}, None
    for line in page.splitlines(keepends=True):
        if line.startswith("<!-- benchmark: "):
            current = line.removeprefix("<!-- benchmark: ").split(" -->")[0].strip()
            found[current] = ""
        if current is not None:
            found[current] += line
    return {name: text.rstrip() + "\n" for name, text in found.items()}


def _cell(value: object) -> str:
    return (f"{value:.3g}" if isinstance(value, float) else str(value)).replace("|", "\\|")


def wide_console() -> Console:
    """The terminal's width at a terminal; WIDE columns when piped, where rich would use 80."""
    return Console() if sys.stdout.isatty() else Console(width=WIDE)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def standalone(run) -> None:
    """`python -m benchmarks.bench_x [--quick]`: run one module and print its table."""
    render(run(quick="--quick" in sys.argv), wide_console())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--only", nargs="*", help="run only these modules (e.g. bench_io)")
    parser.add_argument("--out", type=Path, help="JSON to write (Markdown beside it); "
                        "default: benchmarks/results/latest.json, or quick.json with --quick")
    args = parser.parse_args()
    args.out = args.out or HERE / "results" / ("quick.json" if args.quick else "latest.json")
    console = wide_console()
    modules = sorted(p.stem for p in HERE.glob("bench_*.py"))
    names = args.only or modules
    report = {"machine": machine(), "quick": args.quick, "started": time.ctime(), "results": {}}
    console.print(f"[bold]sstream benchmarks[/bold] on {report['machine']}")
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        began = time.perf_counter()
        result = module.run(quick=args.quick)
        result["seconds"] = round(time.perf_counter() - began, 1)
        report["results"][name] = result
        render(result, console)
    write_atomically(args.out, json.dumps(report, indent=2, default=str))
    write_atomically(args.out.with_suffix(".md"), markdown(report))
    written = [args.out, args.out.with_suffix(".md")]
    if not args.quick:  # the committed tables: the sections of the modules that ran
        previous = DOCS.read_text() if DOCS.exists() else ""
        write_atomically(DOCS, docs_page(report, previous, modules))
        written.append(DOCS)
    console.print(f"results written to {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
