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


# ---- patients and splits ------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sstream.data import read_label_csv  # noqa: E402
from sstream.split import SplitConfig, split_cohort  # noqa: E402


def cohort_rows(patients: int, seed: int) -> tuple[list[int], list[str]]:
    """1-3 slides per patient, a 2:1 imbalance of patients' classes."""
    generator = np.random.default_rng(seed)
    labels, names = [], []
    for p in range(patients):
        label = int(p % 3 == 0)
        for _ in range(int(generator.integers(1, 4))):
            labels.append(label)
            names.append(f"case{p}")
    return labels, names


@settings(max_examples=8, deadline=None)
@given(st.integers(24, 40), st.integers(2, 4), st.sampled_from([0.0, 0.2]),
       st.integers(0, 99))
def test_splits_keep_patients_together_cover_everything_and_stratify(
        tmp_path_factory, patients, folds, test_fraction, seed):
    root = tmp_path_factory.mktemp("split")
    labels, names = cohort_rows(patients, seed)
    data = write_cohort(root, labels, names, size=(8, 8))
    result = split_cohort(SplitConfig(str(data), str(root / "splits"), folds, test_fraction,
                                      seed))
    everything = {s.image: s for s in read_label_csv(data)}

    def read(name):
        return read_label_csv(root / "splits" / f"{name}.csv")

    test = read("test") if test_fraction else []
    val_images = []
    for k in range(folds):
        train_part, val_part = read(f"fold_{k}/train"), read(f"fold_{k}/val")
        sides = [{s.patient for s in part} for part in (train_part, val_part, test)]
        assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
        assert {s.image for s in train_part + val_part + test} == set(everything)
        assert all(everything[s.image].label == s.label for s in train_part + val_part)
        assert {s.label for s in val_part} == {0, 1}  # every class in every validation
        val_images += [s.image for s in val_part]
    assert sorted(val_images) == sorted(s.image for s in everything.values()
                                        if s not in test and s.image not in
                                        {t.image for t in test})
    counts = {c.split: c for c in result.counts}
    assert counts["fold_0/val"].slides == len(read("fold_0/val"))
    assert (root / "splits" / "splits.csv").read_text().startswith("split,slides,patients")


def test_regression_splits_stratify_on_target_bins(tmp_path):
    values = [round(v, 3) for v in np.linspace(0, 1, 24)]
    data = write_cohort(tmp_path, values, [f"c{i // 2}" for i in range(24)], size=(8, 8))
    result = split_cohort(SplitConfig(str(data), str(tmp_path / "s"), 3, task="regression",
                                      bins=3))
    assert result.strata_name == "label bin"
    for c in result.counts:
        if c.split.endswith("val"):
            assert sorted(c.strata) == ["q1", "q2", "q3"] and min(c.strata.values()) >= 2


def test_splits_count_classes_by_name(tmp_path):
    names = ["tumor", "normal"] * 6
    data = write_cohort(tmp_path, names, [f"c{i}" for i in range(12)], size=(8, 8))
    result = split_cohort(SplitConfig(str(data), str(tmp_path / "s"), 2))
    assert all(sorted(c.strata) == ["normal", "tumor"] for c in result.counts)
    assert {s.label for s in read_label_csv(tmp_path / "s" / "fold_0" / "val.csv")} == {
        0, 1}


def test_split_cli_refuses_too_few_patients_in_one_line(tmp_path):
    data = write_cohort(tmp_path, [0, 1, 0, 1, 0, 0], ["a", "b", "c", "d", "e", "f"],
                        size=(8, 8))
    run = runner.invoke(app, ["split", str(data), "--folds", "3", "--out",
                              str(tmp_path / "s")])
    assert run.exit_code == 1 and "class 1 has 2 patients" in run.output
    assert not (tmp_path / "s").exists()
    run = runner.invoke(app, ["split", str(data), "--folds", "1", "--out", str(tmp_path / "s")])
    assert run.exit_code == 2 and "--folds must be at least 2" in run.output


def test_split_json_lists_the_files_written_and_the_counts(tmp_path):
    data = write_cohort(tmp_path, ["tumor", "normal"] * 6, [f"c{i}" for i in range(12)],
                        size=(8, 8))
    run = runner.invoke(app, ["split", str(data), "--folds", "2", "--test-fraction", "0.25",
                              "--out", str(tmp_path / "s"), "--json"])
    assert run.exit_code == 0, run.output
    written = json.loads(run.stdout)
    names = ["test", "fold_0/train", "fold_0/val", "fold_1/train", "fold_1/val"]
    assert [c["split"] for c in written["counts"]] == names
    assert written["files"] == [str(tmp_path / "s" / f"{n}.csv") for n in names + ["splits"]]
    assert all(Path(f).is_file() for f in written["files"])
    assert written["strata_name"] == "class" and written["grouped_by_patient"] is True
    assert sum(c["strata"]["tumor"] for c in written["counts"][1:3]) == 6 - written[
        "counts"][0]["strata"].get("tumor", 0)


def test_report_takes_each_runs_best_epoch_and_gives_mean_and_sd(tmp_path):
    runs = []
    for index, (aucs, accuracy) in enumerate((([0.6, 0.8, 0.7], 0.5), ([0.9, 0.5, 0.9],
                                                                     0.75))):
        run = tmp_path / f"fold{index}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"task": "classification"}))
        lines = ["epoch,train_loss,val_loss,val_accuracy,val_auc,lr"]
        lines += [f"{e + 1},1.0,{1.0 - e / 10},{accuracy},{auc},0.001"
                  for e, auc in enumerate(aucs)]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
        runs.append(str(run))
    run = runner.invoke(app, ["report", *runs, "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.output)
    # fold 0: epoch 2 (AUC 0.8); fold 1: epochs 1 and 3 tie on AUC and accuracy, the lower
    # val loss (epoch 3) wins
    assert [r["best_epoch"] for r in summary["runs"]] == [2, 3]
    auc = summary["metrics"]["val_auc"]
    assert np.isclose(auc["mean"], 0.85) and np.isclose(auc["sd"], np.std([0.8, 0.9], ddof=1))
    assert "lr" not in summary["metrics"]
    table = runner.invoke(app, ["report", *runs])
    assert table.exit_code == 0 and "±" in table.output
    missing = runner.invoke(app, ["report", str(tmp_path)])
    assert missing.exit_code == 1 and "no metrics.csv" in missing.output


# ---- class balance and early stopping -----------------------------------------------------

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.utils.class_weight import compute_class_weight  # noqa: E402

from sstream.task import Classification  # noqa: E402
from sstream.train import epoch_order  # noqa: E402


def test_sampler_draws_classes_equally_and_the_same_on_every_call():
    labels = [0] * 90 + [1] * 10
    task = Classification(2)
    weights = task.balance("sampler", labels)
    draws = np.concatenate([epoch_order(5, epoch, 100, weights) for epoch in range(40)])
    share = np.mean(np.array(labels)[draws])
    assert 0.45 < share < 0.55  # unbalanced order: 0.10
    assert np.array_equal(epoch_order(5, 3, 100, weights), epoch_order(5, 3, 100, weights))
    assert task.class_weights is None and task.balance("none", labels) is None


def test_loss_balance_weights_each_image_by_its_class():
    labels = [0, 0, 0, 1, 2, 2]
    task = Classification(4)
    assert task.balance("loss", labels) is None
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=labels)
    assert np.allclose(task.class_weights, [*expected, 1.0])
    logits = torch.randn(1, 4, dtype=torch.float64)
    for label in (0, 1, 2):
        want = task.class_weights[label] * F.cross_entropy(logits, torch.tensor([label]))
        assert torch.allclose(task.loss(logits, [label]), want)


def imbalanced(tmp_path: Path) -> Path:
    return write_cohort(tmp_path, [0, 0, 0, 1], name="imbalanced")


def test_a_balanced_sampler_run_resumes_exactly(tmp_path):
    """The sampler's draws come from (seed, epoch), as the plain order: an interrupted run
    resumed ends with the uninterrupted run's weights."""
    data = imbalanced(tmp_path)
    settings = dict(epochs=2, accumulate=2, balance="sampler", seed=4)
    full = train(quick(tmp_path / "a", data, **settings))
    polls = {"count": 0}

    def stop_mid_epoch() -> bool:
        polls["count"] += 1
        return polls["count"] == 3

    stopped = train(quick(tmp_path / "b", data, **settings), should_stop=stop_mid_epoch)
    assert stopped.interrupted
    resumed = train(quick(tmp_path / "b", data, **settings), resume=True)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_patience_stops_after_epochs_without_improvement_but_not_before_min_epochs(tmp_path):
    data = write_cohort(tmp_path, [0, 1], name="pair")
    frozen = dict(epochs=8, optimizer="sgd", lr=1e-30, momentum=0.0, weight_decay=0.0,
                  schedule="constant", augment=False, val_csv=str(data), patience=2)
    result = train(quick(tmp_path / "a", data, **frozen))
    assert result.state.epoch == 3 and "stopped early after epoch 3 of 8" in result.stop_reason
    assert "best.pt is epoch 1" in result.stop_reason
    later = train(quick(tmp_path / "b", data, min_epochs=5, **frozen))
    assert later.state.epoch == 5
    resumed = train(quick(tmp_path / "b", data, min_epochs=5, **frozen), resume=True)
    assert resumed.state.epoch == 5  # an exhausted patience stays exhausted on resume
    full = train(quick(tmp_path / "c", data, **{**frozen, "patience": None, "epochs": 1}))
    assert full.stop_reason == "1 of 1 epochs done; best.pt is epoch 1"


# ---- TensorBoard ------------------------------------------------------------------------------

from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def test_tensorboard_holds_every_metric_of_metrics_csv_and_log_none_writes_none(tmp_path):
    data = write_cohort(tmp_path, [0, 1, 0, 1])
    result = train(quick(tmp_path, data, val_csv=str(data), epochs=2))
    events = EventAccumulator(str(result.out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "val/auc", "val/balanced_accuracy", "val/sensitivity",
            "lr", "speed/images_per_s", "memory/peak_mb"} <= tags
    rows = list(csv.DictReader(open(result.out / "metrics.csv")))
    for tag, column in (("loss/train", "train_loss"), ("val/auc", "val_auc"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert np.allclose([s.value for s in scalars], [float(r[column]) for r in rows],
                           rtol=1e-6)
    quiet = train(quick(tmp_path / "b", data, log="none"))
    assert not (quiet.out / "tensorboard").exists()


# ---- class names ------------------------------------------------------------------------------

from sstream.models import load_checkpoint  # noqa: E402


def test_string_labels_are_classes_recorded_in_the_checkpoint_and_named_in_outputs(tmp_path):
    names = ["tumor", "normal", "tumor", "normal"]
    data = write_cohort(tmp_path, names)
    result = train(quick(tmp_path, data, val_csv=str(data)))
    model = load_checkpoint(result.out / "best.pt")
    assert model.config.class_names == ["normal", "tumor"] and model.config.num_classes == 2

    out = tmp_path / "predictions.csv"
    run = runner.invoke(app, ["predict", "--checkpoint", str(result.out / "best.pt"), "--csv",
                              str(data), "--out", str(out), "--tile-size", "32",
                              "--device", "cpu"])
    assert run.exit_code == 0, run.output
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["image", "prob_normal", "prob_tumor", "pred", "label"]
    assert [r["label"] for r in rows] == names
    assert all(r["pred"] in ("normal", "tumor") for r in rows)
    report = json.loads(out.with_name("predictions.metrics.json").read_text())
    assert report[0]["classes"] == ["normal", "tumor"]

    slide = tmp_path / "images" / "data_0.png"
    for chosen, index in (("tumor", 1), ("0", 0)):
        run = runner.invoke(app, ["saliency", str(slide), "-c", str(result.out / "best.pt"),
                                  "--class", chosen, "--no-overview", "--overwrite",
                                  "--device", "cpu", "--tile-size", "32"])
        assert run.exit_code == 0, run.output
        assert f"class {['normal', 'tumor'][index]} (predicted" in run.output
    run = runner.invoke(app, ["saliency", str(slide), "-c", str(result.out / "best.pt"),
                              "--class", "stroma", "--no-overview", "--overwrite"])
    assert run.exit_code == 2 and "normal, tumor" in run.output


def test_a_validation_class_the_training_set_lacks_is_refused_by_line(tmp_path):
    train_csv = write_cohort(tmp_path, ["a", "b", "a", "b"], name="train")
    val_csv = write_cohort(tmp_path, ["a", "c"], name="val")
    try:
        train(quick(tmp_path, train_csv, val_csv=str(val_csv)))
    except ValueError as exc:
        assert "line 3: label 'c' is not one of the classes a, b" in str(exc)
    else:
        raise AssertionError("an unknown class was accepted")


# ---- stain ----------------------------------------------------------------------------------

from sstream.data import PixelSource  # noqa: E402
from sstream.engine import StreamingCNN  # noqa: E402
from sstream.models import ModelConfig, build_model, freeze_batchnorm, streamed_logits  # noqa: E402,I001
from sstream.stain import (  # noqa: E402
    REFERENCE_MAX_CONCENTRATIONS,
    REFERENCE_STAINS,
    HedJitter,
    Macenko,
    Reinhard,
    _lab,
    _reference_lab_statistics,
)
from tests.conftest import float64_training, relative_error  # noqa: E402


def stained_image(shape=(64, 80), seed=0, stains=None) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like uint8 image made from stain vectors (columns H, E) and random
    concentrations, with a glass border; and the concentrations."""
    generator = np.random.default_rng(seed)
    stains = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]) if stains is None else stains
    stains = stains / np.linalg.norm(stains, axis=0)
    concentrations = generator.uniform(0.3, 1.5, (*shape, 2))
    concentrations[:, :6] = 0  # glass
    rgb = np.exp(-(concentrations @ stains.T))
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8), concentrations


def test_a_streamed_step_with_stain_transforms_equals_autograd_on_the_transformed_image():
    rgb, _ = stained_image()
    transforms = {"hed": HedJitter.draw(np.random.default_rng(1), 0.2),
                  "macenko": Macenko.fit(rgb), "reinhard": Reinhard.fit(rgb)}
    with float64_training():
        torch.manual_seed(0)
        model = build_model(ModelConfig("tiny", 2))
        freeze_batchnorm(model.stream, train_affine=True)
        params = [p for p in model.parameters() if p.requires_grad]
        for name, transform in transforms.items():
            source = PixelSource.from_array(rgb, dtype=torch.float64)
            source.stain = transform
            model.zero_grad()
            streamed = streamed_logits(model, StreamingCNN(model.stream, 32), source)
            F.cross_entropy(streamed, torch.tensor([1])).backward()
            streamed_grads = [p.grad.clone() for p in params]
            model.zero_grad()
            whole = transform(PixelSource.from_array(rgb, dtype=torch.float64).to_tensor())
            assert not torch.equal(whole, PixelSource.from_array(
                rgb, dtype=torch.float64).to_tensor()), name  # the transform does something
            plain = model(whole)
            F.cross_entropy(plain, torch.tensor([1])).backward()
            assert relative_error(streamed, plain) < 1e-9, name
            for grad, param in zip(streamed_grads, params):
                assert relative_error(grad, param.grad) < 1e-9, name


def test_macenko_finds_the_stains_and_recolours_with_the_reference():
    stains = np.array([[0.55, 0.25], [0.80, 0.85], [0.30, 0.45]])
    rgb, concentrations = stained_image((48, 48), 2, stains)
    fitted = Macenko.fit(rgb)
    unit = stains / np.linalg.norm(stains, axis=0)
    cosines = np.sum(np.array(fitted.stains) * unit, axis=0)
    assert (cosines > 0.99).all(), cosines
    normalised = fitted(torch.as_tensor(rgb / 255.0).permute(2, 0, 1)[None])
    od = -np.log(np.clip(normalised[0].permute(1, 2, 0).numpy(), 1 / 255, 1))
    tissue_od = od[:, 6:].reshape(-1, 3)
    reference_concentrations = tissue_od @ np.linalg.pinv(REFERENCE_STAINS).T
    # every tissue pixel's OD now lies in the plane of the reference stains, and the
    # concentrations' 99th percentiles are the reference's
    residual = tissue_od - reference_concentrations @ REFERENCE_STAINS.T
    assert np.abs(residual).max() < 0.05
    assert np.allclose(np.percentile(reference_concentrations, 99, axis=0),
                       REFERENCE_MAX_CONCENTRATIONS, rtol=0.05)
    assert concentrations.shape[-1] == 2


def test_reinhard_moves_the_tissue_statistics_to_the_reference():
    rgb, _ = stained_image((48, 48), 3, np.array([[0.3, 0.1], [0.9, 0.6], [0.2, 0.7]]))
    normalised = Reinhard.fit(rgb)(torch.as_tensor(rgb / 255.0).permute(2, 0, 1)[None])
    tissue = normalised[0].permute(1, 2, 0)[:, 6:].reshape(-1, 3)
    lab = _lab(tissue).numpy()
    mean, std = _reference_lab_statistics()
    assert np.allclose(lab.mean(0), mean, atol=0.02) and np.allclose(lab.std(0), std, rtol=0.1)


def test_identity_hed_jitter_keeps_the_pixels():
    pixels = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    assert torch.allclose(HedJitter()(pixels), pixels, atol=1e-12)


def test_training_with_stain_options_records_the_normaliser_for_predict(tmp_path):
    rgb, _ = stained_image((48, 56))
    (tmp_path / "images").mkdir()
    rows = []
    for index in range(2):
        Image.fromarray(np.roll(rgb, index * 7, axis=1)).save(tmp_path / "images" / f"{index}.png")
        rows.append(f"images/{index}.png,{index}")
    data = tmp_path / "data.csv"
    data.write_text("image,label\n" + "\n".join(rows) + "\n")
    run = runner.invoke(app, ["train", "--train-csv", str(data), "--out", str(tmp_path / "run"),
                              "--epochs", "1", "--tile-size", "32", "--device", "cpu",
                              "--augment", "stain", "--stain-normalize", "macenko", "--quiet",
                              "--log", "none"])
    assert run.exit_code == 0, run.output
    model = load_checkpoint(tmp_path / "run" / "best.pt")
    assert model.config.stain_normalize == "macenko"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] == "stain"
    bad = runner.invoke(app, ["train", "--train-csv", str(data), "--out", str(tmp_path / "b"),
                              "--stain-normalize", "vahadane"])
    assert bad.exit_code != 0 and "--stain-normalize must be one of macenko, reinhard" in \
        bad.output


# ---- generated cohorts ------------------------------------------------------------------------


def test_make_sample_data_patients_writes_a_cohort_that_splits(tmp_path):
    run = runner.invoke(app, ["make-sample-data", str(tmp_path), "--count", "12", "--patients",
                              "6", "--size", "64", "--tiff-tile-size", "64", "--val-fraction",
                              "0.34"])
    assert run.exit_code == 0, run.output
    cohort = read_label_csv(tmp_path / "cohort.csv")
    assert len(cohort) == 12 and {s.patient for s in cohort} == {f"case_{p:03d}"
                                                                 for p in range(6)}
    for patient in {s.patient for s in cohort}:
        assert len({s.label for s in cohort if s.patient == patient}) == 1
    train_part, val_part = read_label_csv(tmp_path / "train.csv"), read_label_csv(
        tmp_path / "val.csv")
    assert {s.patient for s in val_part} == {"case_004", "case_005"}
    assert not {s.patient for s in train_part} & {s.patient for s in val_part}
    split = runner.invoke(app, ["split", str(tmp_path / "cohort.csv"), "--folds", "3",
                                "--out", str(tmp_path / "splits")])
    assert split.exit_code == 0 and "fold_2/val" in split.output
    bad = runner.invoke(app, ["make-sample-data", str(tmp_path / "b"), "--count", "4",
                              "--patients", "5"])
    assert bad.exit_code == 2 and "--patients must be in 2..--count" in bad.output
