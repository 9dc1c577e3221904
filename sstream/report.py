"""Cross-validation summary of several training runs (`sstream report`).

Each run directory's `metrics.csv` gives the row of its best epoch, the one `best.pt`
keeps (`sstream.task.selection_score`: the validation AUC then accuracy, or Spearman, then
the lowest loss). Every metric of those rows is summarised as the mean and the sample
standard deviation (n - 1) over the runs, the usual way k-fold results are reported.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sstream.errors import InputError, first_line
from sstream.options import Options, option
from sstream.task import Classification, Regression, Task, selection_score

SKIPPED = ("epoch", "lr", "seconds")   # settings and timings, not results


@dataclass
class RunSummary:
    run: Path
    best_epoch: int
    epochs: int
    row: dict[str, float | None]


@dataclass
class MetricSummary:
    name: str
    mean: float
    sd: float               # sample standard deviation; NaN for one run
    values: list[float]     # one per run, in the order given


@dataclass
class Report:
    runs: list[RunSummary]
    metrics: list[MetricSummary]

    def to_dict(self) -> dict:
        return {"runs": [{"run": str(r.run), "best_epoch": r.best_epoch, "epochs": r.epochs}
                         for r in self.runs],
                "metrics": {m.name: {"mean": _json_number(m.mean), "sd": _json_number(m.sd),
                                     "values": [_json_number(v) for v in m.values]}
                            for m in self.metrics}}


@dataclass
class ReportConfig(Options):
    """The runs `sstream report` summarises."""

    runs: list[str] = option(help="Training output directories (one per fold).", factory=list)

    def validate(self) -> None:
        if not self.runs:
            raise InputError("give at least one run directory")


def report(config: ReportConfig | None = None, **options: Any) -> Report:
    """Summarise the runs' best epochs: `report(ReportConfig(runs))` or `report(runs=runs)`.
    InputError for no runs, a directory without a usable metrics.csv, or runs of different
    tasks."""
    config = ReportConfig.given(config, options)
    config.validate()
    runs = config.runs
    summaries = [_best_epoch(Path(run)) for run in runs]
    kinds = {_task_kind(Path(run)) for run in runs}
    if len(kinds) > 1:
        raise InputError(f"the runs are of different tasks ({', '.join(sorted(kinds))})")
    names = [n for n in summaries[0].row if n not in SKIPPED]
    metrics = []
    for name in names:
        values = [_number(s.row.get(name)) for s in summaries]
        finite = [v for v in values if not math.isnan(v)]
        mean = float(np.mean(finite)) if finite else math.nan
        sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        metrics.append(MetricSummary(name, mean, sd, values))
    return Report(summaries, metrics)


def _best_epoch(run: Path) -> RunSummary:
    path = run / "metrics.csv"
    if not path.is_file():
        raise InputError(f"{run}: no metrics.csv (not a training run directory)")
    with open(path, newline="") as handle:
        rows = [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    if not rows:
        raise InputError(f"{path}: no epochs yet")
    task = _task(run)
    best = max(rows, key=lambda row: selection_score(row, task))
    return RunSummary(run, int(best["epoch"]), len(rows), best)


def _task_kind(run: Path) -> str:
    config = run / "config.json"
    if not config.is_file():
        return "classification"
    try:
        return json.loads(config.read_text()).get("task", "classification")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"{config}: not a readable run configuration ({first_line(exc)})"
                         ) from None


def _task(run: Path) -> Task:
    return Regression() if _task_kind(run) == "regression" else Classification()


def _parse(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value
