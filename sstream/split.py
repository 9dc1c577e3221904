"""Patient-safe, stratified cross-validation splits of one labelled CSV (`sstream split`).

The slides of one patient (the CSV's `patient` column; without it every slide is its own
patient) always land on the same side of every split, so no case is seen in training and
judged in validation or test. Splits are scikit-learn's `StratifiedGroupKFold`: groups are
patients, strata the class labels, or for regression the first target binned at its
quantiles (`bins` bins).

- With `test_fraction` F > 0, a held-out `test.csv` is cut first: one fold of a
  StratifiedGroupKFold into round(1 / F) folds, so its share is about F (whole patients).
- The rest is cut into `folds` folds; `fold_<k>/val.csv` is fold k and `fold_<k>/train.csv`
  every other fold.

Every CSV keeps the input's columns; image and mask paths are rewritten relative to the new
CSV's folder. `splits.csv` counts the slides, patients and classes of every split.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from sstream.data import Sample, read_csv_rows, read_label_csv
from sstream.errors import InputError
from sstream.io import atomic_output
from sstream.options import Options, option
from sstream.task import TASKS, Classification, Regression, Task

PATH_COLUMNS = ("image", "mask")


@dataclass
class SplitConfig(Options):
    """Options of `sstream split`: their defaults and help."""

    csv: str = option(help="Labelled CSV of the whole cohort (image, label, optional patient "
                      "column).")
    out: str = option(help="Folder for test.csv, fold_<k>/train.csv and fold_<k>/val.csv, and "
                      "splits.csv (the counts).")
    folds: int = option(5, "Cross-validation folds.")
    test_fraction: float = option(0.0, "Share of patients held out in test.csv, from every "
                                  "fold (0: none).")
    seed: int = option(0, "Seed of the shuffle: the same seed gives the same splits.")
    task: str = option("classification", "classification (stratified on the class) or "
                       "regression (on quantile bins of the target).")
    bins: int = option(4, "Regression: quantile bins to stratify on.")  # of the first target
    overwrite: bool = option(False, "Replace existing splits.")

    def validate(self) -> None:
        """ValueError for options that cannot work."""
        checks = [(self.folds >= 2, "--folds must be at least 2"),
                  (0 <= self.test_fraction < 0.5, "--test-fraction must be in [0, 0.5)"),
                  (self.task in TASKS, f"--task must be one of {', '.join(TASKS)}"),
                  (self.bins >= 2, "--bins must be at least 2")]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


@dataclass
class SplitCounts:
    """One split's size: slides, patients and slides per stratum (class or target bin)."""

    split: str
    slides: int
    patients: int
    strata: dict[str, int] = field(default_factory=dict)


@dataclass
class SplitResult:
    out: Path
    counts: list[SplitCounts]
    grouped_by_patient: bool    # False: no patient column, every slide its own patient
    strata_name: str            # "class" or "<target> bin"
    files: list[Path] = field(default_factory=list)  # every CSV written, splits.csv last


def split_cohort(config: SplitConfig) -> SplitResult:
    """Write the splits; see the module docstring.

    Raises:
        DatasetError: the CSV is unusable. ValueError: too few patients of a class for the
            folds asked, or bad options. FileExistsError: `out` holds splits and not
            `overwrite`.
    """
    config.validate()
    task: Task = Classification() if config.task == "classification" else Regression()
    samples = read_label_csv(config.csv, task)
    header, rows = _raw_rows(Path(config.csv))
    groups = np.array([s.patient or f"\0line{s.row}" for s in samples])
    strata, strata_name = _strata(samples, task, config.bins)
    out = Path(config.out)
    if (out / "splits.csv").exists() and not config.overwrite:
        raise FileExistsError(f"{out} already holds splits (splits.csv); use --overwrite")
    _check_enough(strata, strata_name, groups, config)
    everything = np.arange(len(samples))
    writes: dict[str, np.ndarray] = {}
    rest = everything
    if config.test_fraction > 0:
        cut = StratifiedGroupKFold(max(2, round(1 / config.test_fraction)), shuffle=True,
                                   random_state=config.seed)
        rest, test = next(cut.split(everything, strata, groups))
        writes["test"] = test
        _check_enough(strata[rest], strata_name, groups[rest], config, "after the test set")
    folds = StratifiedGroupKFold(config.folds, shuffle=True, random_state=config.seed)
    for k, (train, val) in enumerate(folds.split(rest, strata[rest], groups[rest])):
        writes[f"fold_{k}/train"], writes[f"fold_{k}/val"] = rest[train], rest[val]
    if out.exists() and config.overwrite:
        for old in out.glob("fold_*"):
            shutil.rmtree(old)
    counts = []
    for name, picked in writes.items():
        path = out / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_rows(path, header, [rows[samples[i].row] for i in sorted(picked)],
                    Path(config.csv).parent.resolve())
        counts.append(_count(name, strata[picked], groups[picked]))
    _write_counts(out / "splits.csv", counts)
    files = [out / f"{name}.csv" for name in writes] + [out / "splits.csv"]
    return SplitResult(out, counts, any(s.patient for s in samples), strata_name, files)


def _strata(samples: list[Sample], task: Task, bins: int) -> tuple[np.ndarray, str]:
    """Class labels as text, or the first target's quantile bin ('q1' lowest)."""
    if isinstance(task, Classification):
        names = task.names or {}
        return np.array([names[s.label] if names else str(s.label) for s in samples]), "class"
    values = np.array([s.label[0] for s in samples], dtype=np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    binned = np.digitize(values, edges, right=True)
    return np.array([f"q{b + 1}" for b in binned]), f"{task.targets[0]} bin"


def _check_enough(strata: np.ndarray, strata_name: str, groups: np.ndarray,
                  config: SplitConfig, where: str = "") -> None:
    """ValueError when a stratum has fewer patients than the folds need (each fold's
    validation would otherwise miss it)."""
    patients = len(set(groups))
    need = config.folds * (2 if config.test_fraction > 0 and not where else 1)
    if patients < need:
        raise InputError(f"{config.csv}: {patients} patients are too few for {config.folds} "
                         f"folds{' and a test set' if config.test_fraction else ''} "
                         f"(need at least {need})")
    for stratum in sorted(set(strata)):
        holders = len(set(groups[strata == stratum]))
        if holders < config.folds:
            raise InputError(f"{config.csv}: {strata_name} {stratum} has {holders} patients"
                             f"{' ' + where if where else ''}, fewer than --folds "
                             f"{config.folds}: some folds would have none of it in "
                             "validation; use fewer folds")


def _raw_rows(path: Path) -> tuple[list[str], dict[int, list[str]]]:
    """The header and every row as written, by line number (as `Sample.row`)."""
    rows = read_csv_rows(path)
    return rows[0], {line: row for line, row in enumerate(rows[1:], start=2)}


def _write_rows(path: Path, header: list[str], rows: list[list[str]], source: Path) -> None:
    """The rows under the header, their image and mask paths relative to `path`'s folder."""
    columns = [i for i, name in enumerate(header) if name.strip().lower() in PATH_COLUMNS]
    with atomic_output(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row in rows:
                row = list(row)
                for c in columns:
                    if c < len(row) and row[c].strip():
                        row[c] = os.path.relpath(source / row[c].strip(), path.parent.resolve())
                writer.writerow(row)


def _count(name: str, strata: np.ndarray, groups: np.ndarray) -> SplitCounts:
    values, counts = np.unique(strata, return_counts=True)
    return SplitCounts(name, len(strata), len(set(groups)),
                       {str(v): int(c) for v, c in zip(values, counts)})


def _write_counts(path: Path, counts: list[SplitCounts]) -> None:
    strata = sorted({s for c in counts for s in c.strata})
    with atomic_output(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["split", "slides", "patients", *strata])
            for c in counts:
                writer.writerow([c.split, c.slides, c.patients,
                                 *(c.strata.get(s, 0) for s in strata)])

