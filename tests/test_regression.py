"""Regression targets (`--task regression`): labels, an exact streamed step, and the jobs
end to end (train, validate, predict, saliency) against plain PyTorch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import stats

from sstream.data import DatasetError, PixelSource, read_label_csv
from sstream.models import load_checkpoint
from sstream.predict import PredictConfig, predict
from sstream.saliency import compute_saliency
from sstream.task import Regression, task_for_model
from sstream.train import TrainConfig, train
from tests.conftest import float64_training


def write_regression_dataset(root: Path, targets: dict[str, list[float]], name: str = "train",
                             size: tuple[int, int] = (72, 88)) -> Path:
    """Random RGB PNGs whose brightness follows the first target, plus a CSV."""
    rng = np.random.default_rng(len(name))
    count = len(next(iter(targets.values())))
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        path = root / "images" / f"{name}_{index}.png"
        level = int(40 + 20 * next(iter(targets.values()))[index])
        pixels = np.clip(rng.integers(0, 60, (*size, 3)) + level, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        rows.append([f"images/{path.name}", *(values[index] for values in targets.values())])
    csv_path = root / f"{name}.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *(["label"] if list(targets) == ["label"] else
                                    [f"label_{t}" for t in targets])])
        writer.writerows(rows)
    return csv_path


def test_label_problems_are_listed_at_once_with_line_numbers(tmp_path):
    path = write_regression_dataset(tmp_path, {"label": [0.5, 1.0, 2.0, 3.0]})
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",abc"
    lines[2] = lines[2].rsplit(",", 1)[0] + ",nan"
    lines[3] = lines[3].rsplit(",", 1)[0] + ","
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as error:
        read_label_csv(path, Regression())
    message = str(error.value)
    assert "line 2: label 'abc' is not a number" in message
    assert "line 3: label is nan, not a finite number" in message
    assert "line 4: label '' is not a number" in message
    assert "line 5" not in message


def test_several_targets_come_from_label_columns(tmp_path):
    path = write_regression_dataset(tmp_path, {"mitoses": [1, 5, 3], "ki67": [0.1, 0.4, 0.2]})
    task = Regression()
    samples = read_label_csv(path, task)
    assert task.targets == ("mitoses", "ki67")
    assert [s.label for s in samples] == [(1.0, 0.1), (5.0, 0.4), (3.0, 0.2)]
    assert task.prediction_header() == ["prediction_mitoses", "prediction_ki67"]
    both = tmp_path / "both.csv"
    both.write_text("image,label,label_a\nimages/train_0.png,1,2\n")
    with pytest.raises(DatasetError, match="not both"):
        read_label_csv(both, Regression())
    with pytest.raises(DatasetError, match="label_mitoses"):  # validation needs the same
        read_label_csv(write_regression_dataset(tmp_path, {"label": [1.0]}, "val"), task)


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_a_streamed_regression_step_equals_plain_autograd(tmp_path, loss):
    """One SGD step (two images accumulated, standardised targets, float64) of `train` on
    the whole-slide path equals the same step in plain PyTorch on the whole images."""
    path = write_regression_dataset(tmp_path, {"label": [0.5, 2.5]})
    settings = TrainConfig(train_csv=str(path), out=str(tmp_path / "run"), task="regression",
                           loss=loss, epochs=1, tile_size=32, device="cpu", lr=1e-2,
                           accumulate=2, augment=False, optimizer="sgd", momentum=0.0,
                           weight_decay=0.0, schedule="constant", seed=3, tissue="none")
    with float64_training():
        torch.manual_seed(settings.seed)
        result = train(settings)
        reference = load_checkpoint(tmp_path / "run" / "last.pt")
        initial = _initial_model(settings)
    task = task_for_model(initial, loss)
    assert torch.equal(initial.head.scale.mean, torch.tensor([1.5], dtype=torch.float64))
    assert torch.equal(initial.head.scale.std, torch.tensor([1.0], dtype=torch.float64))
    optimizer = torch.optim.SGD([p for p in initial.parameters() if p.requires_grad], lr=1e-2)
    with float64_training():
        for row in csv.DictReader(open(path)):
            image = np.asarray(Image.open(path.parent / row["image"]))
            x = PixelSource.from_array(image, dtype=torch.float64).to_tensor()
            (task.loss(initial(x), [(float(row["label"]),)]) / 2).backward()
        optimizer.step()
    trained = result.model.state_dict()
    for name, value in initial.state_dict().items():
        error = (trained[name] - value).abs().max() / (value.abs().max() or 1)
        assert error < 1e-9, name
    assert torch.equal(reference.head.scale.mean, initial.head.scale.mean)


def _initial_model(settings: TrainConfig):
    """The model `train` starts from (same seed, same build, targets fitted)."""
    from sstream.models import ModelConfig, build_model, freeze_batchnorm

    torch.manual_seed(settings.seed)  # as train seeds before it builds the model
    task = Regression(loss_name=settings.loss)
    labels = [s.label for s in read_label_csv(settings.train_csv, task)]
    model = build_model(ModelConfig(settings.model, **task.model_fields()))
    task.prepare_model(model, labels)
    freeze_batchnorm(model.stream, train_affine=True)
    return model.train()


def test_regression_trains_validates_predicts_and_explains(tmp_path):
    """metrics.csv carries the regression metrics (equal to scipy's on the validation
    predictions), best.pt follows validation Spearman, predict writes values in the label's
    units, and saliency explains the chosen target."""
    targets = {"score": [0.0, 1.0, 2.0, 3.0, 0.5, 2.5], "count": [3, 1, 4, 1, 5, 9]}
    train_csv = write_regression_dataset(tmp_path, targets)
    val_csv = write_regression_dataset(tmp_path, {"score": [0.2, 2.8, 1.5],
                                                  "count": [2, 6, 5]}, "val")
    settings = TrainConfig(train_csv=str(train_csv), val_csv=str(val_csv),
                           out=str(tmp_path / "run"), task="regression", loss="huber",
                           epochs=2, tile_size=32, device="cpu", lr=1e-2, seed=1,
                           tissue="none")  # plain PyTorch below sees every pixel too
    result = train(settings)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert {"val_spearman", "val_pearson", "val_mae", "val_rmse", "val_loss"} <= set(rows[0])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0

    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best.config.task == "regression" and best.config.targets == ["score", "count"]
    out = tmp_path / "predictions.csv"
    predicted = predict(PredictConfig(checkpoint=str(tmp_path / "run" / "best.pt"),
                                      csv=str(val_csv), out=str(out), tile_size=32,
                                      device="cpu"))
    written = list(csv.DictReader(open(out)))
    assert list(written[0]) == ["image", "prediction_score", "prediction_count",
                                "label_score", "label_count"]
    values = np.array([[float(r["prediction_score"]), float(r["prediction_count"])]
                       for r in written])
    # the module itself answers in the label's units: plain PyTorch on the whole image
    for row, expected in zip(written, values):
        image = np.asarray(Image.open(val_csv.parent / row["image"]))
        with torch.no_grad():
            plain = best(PixelSource.from_array(image).to_tensor())[0].numpy()
        assert np.allclose(plain, expected, rtol=1e-4, atol=1e-4)
    labels = np.array([targets_ for targets_ in zip([0.2, 2.8, 1.5], [2, 6, 5])])
    spearman = np.mean([stats.spearmanr(values[:, k], labels[:, k]).statistic
                        for k in range(2)])
    assert np.isclose(predicted.metrics["spearman"], spearman, atol=1e-4)
    assert np.isclose(predicted.metrics["mae"], np.abs(values - labels).mean(0).mean(),
                      atol=1e-4)
    best_epoch = max(rows, key=lambda r: float(r["val_spearman"]))["epoch"]
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["train_state"]
    assert str(state["epoch"]) == best_epoch or float(rows[0]["val_spearman"]) == float(
        rows[1]["val_spearman"])
    assert result.state.epoch == 2

    slide = val_csv.parent / written[0]["image"]
    saliency = compute_saliency(slide, tmp_path / "run" / "best.pt", tmp_path / "map.tif",
                                index=1, tile_size=32, device="cpu", tissue="none")
    record = json.loads(tifffile.TiffFile(tmp_path / "map.tif").pages[0].description)
    assert record["target"] == 1 and record["target_name"] == "count"
    assert np.allclose(record["predictions"], values[0], rtol=1e-4, atol=1e-4)
    assert "target count" in saliency.summary and saliency.nonzero > 0
    with pytest.raises(ValueError, match="target 2 out of range"):
        compute_saliency(slide, tmp_path / "run" / "best.pt", tmp_path / "map2.tif", index=2)


def test_an_interrupted_regression_run_resumes_exactly(tmp_path):
    """Two epochs in one go, and one epoch then `resume` to two: the same weights, target
    scale and metrics (CPU, fixed seed)."""
    path = write_regression_dataset(tmp_path, {"label": [0.5, 2.5, 1.0, 4.0]})
    val = write_regression_dataset(tmp_path, {"label": [1.5, 3.0]}, "val")
    common = dict(train_csv=str(path), val_csv=str(val), task="regression", loss="l1",
                  tile_size=32, device="cpu", lr=1e-2, accumulate=2, seed=2, dropout=0.2,
                  schedule="constant")  # the same learning rates, however many epochs
    straight = train(TrainConfig(**common, epochs=2, out=str(tmp_path / "straight")))
    train(TrainConfig(**common, epochs=1, out=str(tmp_path / "resumed")))
    resumed = train(TrainConfig(**common, epochs=2, out=str(tmp_path / "resumed")),
                    resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    for mine, theirs in zip(resumed.state.history, straight.state.history, strict=True):
        for key in ("train_loss", "val_loss", "val_spearman", "val_mae"):
            assert mine[key] == theirs[key], key
