"""Cohort training (issue 29): clinical metrics and confidence intervals, patients and
splits, class balance, early stopping, TensorBoard, stain, class names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sstream.cli import app
from sstream.metrics import bootstrap_auc
from sstream.train import TrainConfig, train

runner = CliRunner()


def write_cohort(root: Path, labels: list, patients: list[str] | None = None,
                 name: str = "data", size: tuple[int, int] = (48, 56)) -> Path:
    """Random RGB PNGs with the given labels (and patients), and their CSV."""
    rng = np.random.default_rng(len(labels))
    (root / "images").mkdir(parents=True, exist_ok=True)
    header = ["image", "label"] + (["patient"] if patients else [])
    rows = []
    for index, label in enumerate(labels):
        path = root / "images" / f"{name}_{index}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        rows.append([f"images/{path.name}", label] + ([patients[index]] if patients else []))
    csv_path = root / f"{name}.csv"
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return csv_path


def quick(tmp_path: Path, train_csv: Path, **overrides) -> TrainConfig:
    values = dict(train_csv=str(train_csv), out=str(tmp_path / "run"), epochs=1,
                  tile_size=32, device="cpu", lr=1e-2, seed=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_training_writes_clinical_metrics_and_figures_and_predict_reports_a_ci(tmp_path):
    patients = ["p1", "p1", "p2", "p3", "p3", "p4"]
    labels = [0, 0, 1, 1, 1, 0]  # a patient's slides share a label
    data = write_cohort(tmp_path, labels, patients)
    result = train(quick(tmp_path, data, val_csv=str(data)))
    header = (result.out / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("val_balanced_accuracy", "val_macro_f1", "val_sensitivity",
                   "val_specificity", "val_auc"):
        assert column in header
    for figure in ("val_confusion.png", "val_roc.png"):
        assert Image.open(result.out / figure).size[0] > 100

    out = tmp_path / "predictions.csv"
    run = runner.invoke(app, ["predict", "--checkpoint", str(result.out / "best.pt"), "--csv",
                              str(data), "--out", str(out), "--tile-size", "32",
                              "--device", "cpu"])
    assert run.exit_code == 0, run.output
    assert "95% CI" in run.output and "4 patients" in run.output
    report = json.loads(out.with_name("predictions.metrics.json").read_text())
    assert [r["level"] for r in report] == ["slide", "patient"]
    assert report[1]["count"] == 4 and np.sum(report[1]["confusion"]) == 4
    rows = list(csv.DictReader(open(out)))
    probabilities = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    auc, low, high = bootstrap_auc(probabilities, np.array(labels))
    assert np.allclose([report[0]["metrics"]["auc"], *report[0]["auc_ci95"]],
                       [auc, low, high], atol=1e-5)
    assert out.with_name("predictions.roc.png").is_file()
