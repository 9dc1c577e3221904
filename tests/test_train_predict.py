"""Training and prediction end to end: exact steps, exact resume, predictions vs conventional."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sstream.data import PixelSource
from sstream.models import ModelConfig, build_model, freeze_batchnorm, load_checkpoint
from sstream.predict import PredictConfig, predict
from sstream.train import TrainConfig, TrainEvents, TrainingError, train
from tests.conftest import float64_training


def write_dataset(root: Path, count: int = 4, size: tuple[int, int] = (72, 88),
                  name: str = "train") -> Path:
    """Random RGB PNGs with alternating labels, plus a CSV with relative paths."""
    rng = np.random.default_rng(len(name) + count)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        path = root / "images" / f"{name}_{index}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        rows.append((f"images/{path.name}", index % 2))
    csv_path = root / f"{name}.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    return csv_path


def config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(train_csv=str(write_dataset(tmp_path)), out=str(tmp_path / "run"),
                  epochs=2, tile_size=32, device="cpu", lr=1e-2, accumulate=2, seed=3,
                  dropout=0.3)
    values.update(overrides)
    return TrainConfig(**values)


def test_one_step_equals_conventional_training(tmp_path):
    """Two images accumulated into one SGD step: streamed == whole-image autograd."""
    settings = config(tmp_path, epochs=1, augment=False, dropout=0.0, optimizer="sgd",
                      momentum=0.0, weight_decay=0.0, schedule="constant")
    rows = list(csv.DictReader(open(settings.train_csv)))[:2]
    with open(settings.train_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    torch.manual_seed(settings.seed)
    reference = build_model(ModelConfig("tiny", 2, dropout=0.0))
    freeze_batchnorm(reference.stream, train_affine=True)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad],
                                lr=settings.lr, momentum=0.0)
    for row in rows:
        image = np.asarray(Image.open(Path(settings.train_csv).parent / row["image"]))
        x = PixelSource.from_array(image).to_tensor()
        loss = F.cross_entropy(reference(x), torch.tensor([int(row["label"])])) / 2
        loss.backward()
    optimizer.step()

    result = train(settings)
    trained = result.model.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.allclose(trained[name], value, rtol=1e-4, atol=1e-6), name


class StartInfo(TrainEvents):
    def on_start(self, info):
        self.info = info


def test_the_whole_slide_path_trains_as_the_feature_map_path(tmp_path):
    """A pooling head trains on the whole-slide path by default (said at start-up): after two
    SGD steps (four images, accumulate 2, augmentation and dropout on) its weights equal
    those of the feature-map path (--no-whole-slide), float64."""
    assert_both_paths_train_alike(tmp_path)


def assert_both_paths_train_alike(tmp_path, **overrides) -> dict:
    """Train two SGD steps in float64 on the whole-slide path and on the feature-map path
    (each said at start-up) and assert equal weights; returns the state dicts by path."""
    settings = config(tmp_path, epochs=1, optimizer="sgd", weight_decay=0.0, **overrides)
    runs = {}
    with float64_training():
        for path in ("whole-slide", "feature map"):
            settings.whole_slide = path == "whole-slide"
            events = StartInfo()
            settings.out = str(tmp_path / path.replace(" ", "_"))
            result = train(settings, events)
            assert events.info["path"] == path and result.state.step == 2
            runs[path] = result.model.state_dict()
    for name, value in runs["feature map"].items():
        error = (runs["whole-slide"][name] - value).abs().max() / (value.abs().max() or 1)
        assert error < 1e-9, name
    return runs


def test_amp_trains_on_the_whole_slide_path(tmp_path):
    """--amp (bf16 autocast on the CPU) on the whole-slide path: two steps land near the
    float32 run's weights (bf16 keeps about 3 significant digits)."""
    runs = {}
    for amp in (False, True):
        settings = config(tmp_path / str(amp), epochs=1, optimizer="sgd", dropout=0.0,
                          amp=amp)
        runs[amp] = train(settings).model.state_dict()
    for name, value in runs[False].items():
        assert torch.allclose(runs[True][name], value, rtol=5e-2, atol=5e-3), name


def test_the_original_command_with_resume_continues_its_run(tmp_path):
    """Re-running the same `sstream train ...` with `--resume DIR` appended (and more
    epochs) continues the run; `--out DIR` is the same run; a changed value is refused,
    naming the option with its saved and new values."""
    from typer.testing import CliRunner

    from sstream.cli import app

    csv_path = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    command = ["train", "--train-csv", str(csv_path), "--out", str(out), "--model", "tiny",
               "--tile-size", "32", "--device", "cpu", "--seed", "3", "--quiet"]
    runner = CliRunner()
    first = runner.invoke(app, [*command, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    relative = [str(Path(a).relative_to(Path.cwd())) if a.startswith(str(Path.cwd())) else a
                for a in command]  # paths written another way resolve the same
    again = runner.invoke(app, [*relative, "--epochs", "2", "--resume", str(out)])
    assert again.exit_code == 0, again.output
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 2
    changed = runner.invoke(app, [*command, "--epochs", "3", "--seed", "4", "--model",
                                  "resnet18", "--resume", str(out)])
    assert changed.exit_code == 2
    message = " ".join(changed.output.split())
    assert "--model was tiny, now resnet18; --seed was 3, now 4" in message, message
    elsewhere = runner.invoke(app, [*command[:3], "--out", str(tmp_path / "other"),
                                    "--resume", str(out)])
    assert elsewhere.exit_code == 2 and "--out was" in " ".join(elsewhere.output.split())


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    full = train(config(tmp_path / "a"))
    polls = {"count": 0}

    def stop_after_three_images() -> bool:
        polls["count"] += 1
        return polls["count"] == 3  # mid-epoch, in the middle of an accumulation group

    interrupted = train(config(tmp_path / "b"), should_stop=stop_after_three_images)
    assert interrupted.interrupted and interrupted.state.image_index == 2
    resumed = train(config(tmp_path / "b"), resume=True)
    assert not resumed.interrupted
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    metrics = (tmp_path / "b" / "run" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch,train_loss") and len(metrics) == 3
    assert (tmp_path / "b" / "run" / "curves.png").stat().st_size > 0


def test_outputs_and_refusal_to_clobber(tmp_path):
    settings = config(tmp_path, epochs=1, val_csv=str(write_dataset(tmp_path, 2, name="val")))
    train(settings)
    run = Path(settings.out)
    assert {"last.pt", "best.pt", "metrics.csv", "curves.png", "config.json"} <= {
        p.name for p in run.iterdir()}
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_auc", "val_accuracy", "val_loss", "images_per_s"} <= set(header)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(settings)
    assert (run / "last.pt").read_bytes() == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    settings = config(tmp_path, epochs=2, accumulate=1)
    train(TrainConfig(**{**settings.__dict__, "epochs": 1}))
    good = (Path(settings.out) / "last.pt").read_bytes()
    calls = {"n": 0}
    real = F.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr("sstream.task.F.cross_entropy", poisoned)
    with pytest.raises(TrainingError, match="nan"):
        train(settings, resume=True)
    assert (Path(settings.out) / "last.pt").read_bytes() == good


def test_predictions_equal_the_conventional_model(tmp_path):
    settings = config(tmp_path, epochs=1)
    train(settings)
    checkpoint = Path(settings.out) / "last.pt"
    csv_path = write_dataset(tmp_path / "test", 3, size=(131, 97), name="test")
    result = predict(PredictConfig(checkpoint=str(checkpoint), csv=str(csv_path),
                                   out=str(tmp_path / "preds.csv"), tile_size=32, device="cpu"))
    model = load_checkpoint(checkpoint)
    assert len(result.predictions) == 3 and not result.failures
    for prediction in result.predictions:
        image = np.asarray(Image.open(csv_path.parent / prediction.image))
        with torch.no_grad():
            expected = torch.softmax(model(PixelSource.from_array(image).to_tensor()), -1)[0]
        assert np.allclose(prediction.values, expected.numpy(), atol=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert list(rows[0]) == ["image", "prob_0", "prob_1", "pred", "label"]
    assert result.metrics is not None and 0.0 <= result.metrics["accuracy"] <= 1.0


def test_one_unreadable_slide_is_skipped_and_reported(tmp_path):
    settings = config(tmp_path, epochs=1)
    train(settings)
    good = write_dataset(tmp_path / "p", 1, name="good").parent / "images" / "good_0.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    result = predict(PredictConfig(checkpoint=str(Path(settings.out) / "last.pt"),
                                   images=[str(good), str(broken)], device="cpu"))
    assert [p.image for p in result.predictions] == [str(good)]
    assert len(result.failures) == 1 and "broken.png" in result.failures[0][0]


def test_memory_budget_picks_the_largest_fitting_tile(tmp_path):
    from sstream.engine.memory import estimate_training_memory
    from sstream.train import tile_for_budget

    model = build_model(ModelConfig("tiny"))
    settings = TrainConfig(train_csv="unused.csv")
    peaks = {row.tile_size[0]: row.peak_bytes for row in estimate_training_memory(
        model.stream, model.head, (1000, 900), [256, 512]).rows if row.mode == "streaming"}
    assert peaks[256] < peaks[512]
    between = str((peaks[256] + peaks[512]) // 2)
    assert tile_for_budget(model, (1000, 900), between, settings) == (256, "auto")
    assert tile_for_budget(model, (1000, 900), "64GiB", settings) == (512, "auto")
    with pytest.raises(ValueError, match="no tile fits the memory budget"):
        tile_for_budget(model, (1000, 900), "1KB", settings)


def test_memory_budget_falls_back_to_the_crop_engine_where_no_halo_tile_fits():
    """Small tiles on a very wide image: the halo engine's line buffers (as wide as the
    image) outgrow the crop engine's whole step, so a budget between the two picks crops
    (with engine "auto" only)."""
    from sstream.engine.memory import estimate_training_memory
    from sstream.train import TILE_CANDIDATES, tile_for_budget

    model = build_model(ModelConfig("tiny"))
    size = (1024, 65536)
    smallest = {engine: min(row.peak_bytes for row in estimate_training_memory(
        model.stream, model.head, size, [t for t in TILE_CANDIDATES if t <= 1024],
        engine=engine).rows
        if row.mode == "streaming") for engine in ("halo", "crop")}
    assert smallest["crop"] < smallest["halo"]
    between = str((smallest["crop"] + smallest["halo"]) // 2)
    tile, engine = tile_for_budget(model, size, between, TrainConfig(train_csv="unused.csv"))
    assert engine == "crop"
    with pytest.raises(ValueError, match="no tile fits the memory budget"):
        tile_for_budget(model, size, between, TrainConfig(train_csv="u.csv", engine="halo"))
