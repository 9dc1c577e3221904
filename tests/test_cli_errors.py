"""Bad input through the CLI: one matrix, one line per case.

Each case builds its files in a temporary folder and gives the command line; the command
must exit with the stated code, print a short message containing the stated text on stderr,
print no traceback, and leave no partial or clobbered output behind.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from sstream.cli import app
from sstream.errors import InputError
from sstream.models import ModelConfig, build_model, checkpoint_payload

USAGE, FAILURE = 2, 1


def png(path: Path, size: tuple[int, int] = (64, 64), channels: int = 3) -> Path:
    rng = np.random.default_rng(0)
    shape = (*size, channels) if channels > 1 else size
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def label_csv(path: Path, rows: list[tuple[str, str]], header: str = "image,label") -> Path:
    with open(path, "w", newline="") as handle:
        handle.write(header + "\n")
        csv.writer(handle).writerows(rows)
    return path


def dataset(root: Path, count: int = 2, **png_options) -> Path:
    rows = [(png(root / f"img{i}.png", **png_options).name, str(i % 2)) for i in range(count)]
    return label_csv(root / "train.csv", rows)


def checkpoint(root: Path) -> Path:
    path = root / "model.pt"
    torch.save(checkpoint_payload(build_model(ModelConfig("tiny"))), path)
    return path


def train_args(root: Path, *extra: str) -> list[str]:
    return ["train", "--train-csv", str(dataset(root)), "--out", str(root / "run"), "--epochs",
            "1", "--tile-size", "32", "--device", "cpu", "--quiet", *extra]


@dataclass
class Case:
    build: Callable[[Path], list[str]]
    code: int
    message: str


def _missing_csv(root):
    return ["train", "--train-csv", str(root / "nope.csv"), "--out", str(root / "run")]


def _csv_from_rows(rows, header="image,label"):
    def build(root):
        png(root / "a.png")
        png(root / "b.png")
        return ["train", "--train-csv", str(label_csv(root / "t.csv", rows, header)),
                "--out", str(root / "run"), "--quiet"]
    return build


def _empty_csv(root):
    (root / "t.csv").write_text("")
    return ["train", "--train-csv", str(root / "t.csv"), "--out", str(root / "run")]


def _bad_image(content: bytes, name: str = "bad.png"):
    def build(root):
        (root / name).write_bytes(content)
        png(root / "ok.png")
        return ["train", "--train-csv", str(label_csv(root / "t.csv", [(name, "0"),
                                                                        ("ok.png", "1")])),
                "--out", str(root / "run"), "--quiet"]
    return build


def _truncated_tiff(root):
    path = root / "slide.tif"
    tifffile.imwrite(path, np.zeros((256, 256, 3), np.uint8), tile=(64, 64),
                     compression="zlib")
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 3])
    png(root / "ok.png")
    return ["train", "--train-csv", str(label_csv(root / "t.csv", [("slide.tif", "0"),
                                                                    ("ok.png", "1")])),
            "--out", str(root / "run"), "--quiet"]


def _tiny_image(root):
    png(root / "small.png", size=(8, 8))
    png(root / "ok.png")
    return ["train", "--train-csv", str(label_csv(root / "t.csv", [("small.png", "0"),
                                                                    ("ok.png", "1")])),
            "--out", str(root / "run"), "--quiet"]


def _existing_run(root):
    args = train_args(root)
    (root / "run").mkdir()
    (root / "run" / "last.pt").write_bytes(b"precious")
    return args


def _out_under_a_file(root):
    (root / "file").write_text("x")
    args = train_args(root)
    args[args.index("--out") + 1] = str(root / "file" / "run")
    return args


def _weights_of_other_architecture(root):
    torch.save(build_model(ModelConfig("resnet18")).state_dict(), root / "w.pth")
    return train_args(root, "--weights", str(root / "w.pth"))


def _corrupt_checkpoint(root):
    (root / "model.pt").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    return ["predict", "--checkpoint", str(root / "model.pt"), str(png(root / "a.png"))]


def _checkpoint_of_other_model(root):
    payload = checkpoint_payload(build_model(ModelConfig("tiny")))
    payload["model_config"]["name"] = "resnet18"
    torch.save(payload, root / "model.pt")
    return ["predict", "--checkpoint", str(root / "model.pt"), str(png(root / "a.png"))]


def _predict_output_exists(root):
    (root / "preds.csv").write_text("keep me")
    return ["predict", "--checkpoint", str(checkpoint(root)), str(png(root / "a.png")),
            "--out", str(root / "preds.csv")]


def _predict_unreadable(root):
    (root / "bad.tif").write_bytes(b"II*\x00garbage")
    return ["predict", "--checkpoint", str(checkpoint(root)), str(png(root / "a.png")),
            str(root / "bad.tif"), "--quiet"]


def _saliency(root, *extra):
    return ["saliency", str(png(root / "a.png", size=(80, 80))), "--checkpoint",
            str(checkpoint(root)), "--out", str(root / "map.tif"), "--no-overview", *extra]


def _saliency_output_exists(root):
    args = _saliency(root)
    (root / "map.tif").write_text("keep me")
    return args


def _resumed_with_another_lr(root):
    from sstream.train import TrainConfig

    (root / "run").mkdir()
    saved = TrainConfig(train_csv=str(dataset(root)), out=str(root / "run"))
    (root / "run" / "config.json").write_text(json.dumps(saved.to_dict()))
    return ["train", "--resume", str(root / "run"), "--lr", "0.1"]


def _resume_without_checkpoint(root):
    (root / "run").mkdir()
    return ["train", "--resume", str(root / "run")]


CASES: dict[str, Case] = {
    # files
    "csv missing": Case(_missing_csv, FAILURE, "CSV file not found"),
    "csv is a directory": Case(lambda r: ["train", "--train-csv", str(r), "--out",
                                          str(r / "run")], FAILURE, "is not a file"),
    "csv empty": Case(_empty_csv, FAILURE, "empty"),
    "csv wrong header": Case(_csv_from_rows([("a.png", "0")], "path,class"), FAILURE,
                             "expected 'image,label'"),
    "csv bad label": Case(_csv_from_rows([("a.png", "zero"), ("b.png", "1")]), FAILURE,
                          "line 2: label 'zero' is not an integer"),
    "csv negative label": Case(_csv_from_rows([("a.png", "-1"), ("b.png", "1")]), FAILURE,
                               "out of range"),
    "csv duplicate rows": Case(_csv_from_rows([("a.png", "0"), ("a.png", "0")]), FAILURE,
                               "line 3: duplicate of line 2"),
    "csv path does not resolve": Case(_csv_from_rows([("a.png", "0"), ("zzz/b.png", "1")]),
                                      FAILURE, "line 3: image not found"),
    "image is not an image": Case(_bad_image(b"hello, I am text"), FAILURE, "bad.png"),
    "image empty file": Case(_bad_image(b""), FAILURE, "bad.png"),
    "truncated tiff": Case(_truncated_tiff, FAILURE, "slide.tif"),
    "image below network minimum": Case(_tiny_image, FAILURE, "smaller than the model"),
    # models and checkpoints
    "unknown model": Case(lambda r: train_args(r, "--model", "resnet9000"), FAILURE,
                          "unknown model 'resnet9000'"),
    "unknown split point": Case(lambda r: train_args(r, "--stream-layers", "layer9"), FAILURE,
                                "valid split points"),
    "weights of another architecture": Case(_weights_of_other_architecture, FAILURE,
                                            "weights do not fit"),
    "checkpoint missing": Case(lambda r: ["predict", "--checkpoint", str(r / "none.pt"),
                                          str(png(r / "a.png"))], FAILURE,
                               "no such checkpoint"),
    "checkpoint corrupt": Case(_corrupt_checkpoint, FAILURE, "not a readable checkpoint"),
    "checkpoint of another model": Case(_checkpoint_of_other_model, FAILURE, "do not fit"),
    "one unreadable slide in predict": Case(_predict_unreadable, FAILURE, "bad.tif"),
    # options
    "zero tile size": Case(lambda r: train_args(r, "--tile-size", "0"), FAILURE,
                           "--tile-size must be positive"),
    "negative epochs": Case(lambda r: train_args(r, "--epochs", "-3"), FAILURE,
                            "--epochs must be at least 1"),
    "bad image size": Case(lambda r: train_args(r, "--image-size", "12xfoo"), USAGE,
                           "--image-size must be a positive integer or WxH"),
    "level with mpp": Case(lambda r: train_args(r, "--level", "0", "--mpp", "0.5"), USAGE,
                           "--level or --mpp, not both"),
    "unknown optimizer": Case(lambda r: train_args(r, "--optimizer", "lion"), FAILURE,
                              "--optimizer must be one of"),
    "unknown engine": Case(lambda r: train_args(r, "--engine", "fast"), FAILURE,
                           "--engine must be one of auto, halo, crop"),
    "cuda without gpu": Case(lambda r: train_args(r, "--device", "cuda"), FAILURE,
                             "no CUDA GPU"),
    "existing run without overwrite": Case(_existing_run, FAILURE, "--resume"),
    "output under a file": Case(_out_under_a_file, FAILURE, "file"),
    "predict output exists": Case(_predict_output_exists, FAILURE, "--overwrite"),
    "resume without checkpoint": Case(_resume_without_checkpoint, FAILURE,
                                      "not a training directory"),
    "resume with other options": Case(_resumed_with_another_lr, USAGE,
                                      "--lr was 0.001, now 0.1 (only --epochs, --device"),
    # saliency and estimate-memory (their own modules test more cases)
    "saliency slide unreadable": Case(lambda r: ["saliency", str(r / "none.tif"),
                                                 "--checkpoint", str(checkpoint(r))],
                                      FAILURE, "none.tif"),
    "saliency class out of range": Case(lambda r: _saliency(r, "--class", "7"), USAGE,
                                        "class"),
    "saliency output exists": Case(_saliency_output_exists, FAILURE, "--overwrite"),
    "saliency cuda without gpu": Case(lambda r: _saliency(r, "--device", "cuda"), FAILURE,
                                      "no CUDA GPU"),
    "saliency output dir missing": Case(lambda r: [*_saliency(r)[:-3], "--out",
                                                   str(r / "no" / "map.tif"), "--no-overview"],
                                        FAILURE, "does not exist"),
    "estimate unknown model": Case(lambda r: ["estimate-memory", "--size", "512", "--model",
                                              "alexnet9"], USAGE, "unknown model"),
    "estimate bad size": Case(lambda r: ["estimate-memory", "--size", "-5"], USAGE, "size"),
    "estimate tile larger than image": Case(lambda r: ["estimate-memory", "--size", "100",
                                                       "--tile-size", "512"], USAGE,
                                            "larger than the image"),
    "estimate bad budget": Case(lambda r: ["estimate-memory", "--size", "1000", "--budget",
                                           "12Gx"], USAGE, "cannot parse memory budget"),
    "missing config file": Case(lambda r: train_args(r, "--config", str(r / "none.toml")),
                                USAGE, "no such file"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_clear_line(name, tmp_path):
    case = CASES[name]
    args = case.build(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, args)
    assert result.exit_code == case.code, (result.exit_code, result.output)
    stderr = result.stderr
    assert case.message in " ".join(stderr.split()), stderr
    assert "Traceback" not in result.output
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) >= 1 and len(stderr.strip().splitlines()) <= 4, stderr
    after = {p: p.read_bytes() for p in before if p.exists()}
    assert after == before, "an existing file was changed or removed"
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    assert not leftovers, leftovers


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(app, ["--debug", *_missing_csv(tmp_path)])
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.parametrize("image", ["gray", "rgba", "uint16"])
def test_unusual_pixel_formats_are_converted_and_train(image, tmp_path):
    """1-channel, 4-channel and 16-bit images are converted as documented, not refused."""
    rng = np.random.default_rng(1)
    arrays = {"gray": rng.integers(0, 256, (64, 64), dtype=np.uint8),
              "rgba": rng.integers(0, 256, (64, 64, 4), dtype=np.uint8),
              "uint16": rng.integers(0, 65536, (64, 64, 3), dtype=np.uint16)}
    for i in range(2):
        tifffile.imwrite(tmp_path / f"{i}.tif", arrays[image])
    csv_path = label_csv(tmp_path / "t.csv", [("0.tif", "0"), ("1.tif", "1")])
    result = CliRunner().invoke(app, ["train", "--train-csv", str(csv_path), "--out",
                                      str(tmp_path / "run"), "--epochs", "1", "--tile-size",
                                      "32", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last.pt").is_file()


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A write that fails (ENOSPC) is one line, exit 1, and last.pt keeps its old content."""
    import errno

    import sstream.train

    args = train_args(tmp_path)
    assert CliRunner().invoke(app, args).exit_code == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sstream.train.torch, "save", full_disk)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), "--epochs",
                                      "2", "--quiet"])
    assert result.exit_code == FAILURE
    assert "No space left on device" in result.stderr and "Traceback" not in result.output
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("error, shown", [(KeyError("levels"), "KeyError: 'levels'"),
                                          (ValueError("bad value"), "ValueError: bad value")])
def test_a_bug_shows_its_traceback_and_asks_for_a_report(error, shown, tmp_path, monkeypatch):
    """An exception sstream did not raise on purpose (a plain ValueError included: ours are
    InputErrors) is not dressed up as a user error."""
    import sstream.io.info

    def broken(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(sstream.io.info, "slide_info", broken)
    result = CliRunner().invoke(app, ["info", str(png(tmp_path / "a.png"))])
    assert result.exit_code == FAILURE
    assert "Traceback" in result.stderr and shown in result.stderr
    assert "a bug in sstream" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("error", [InputError("bad value"), FileNotFoundError("no file"),
                                   MemoryError("cannot allocate")])
def test_user_errors_stay_one_line(error, tmp_path, monkeypatch):
    import sstream.io.info

    def failing(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(sstream.io.info, "slide_info", failing)
    result = CliRunner().invoke(app, ["info", str(png(tmp_path / "a.png"))])
    assert result.exit_code == FAILURE and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1


def test_our_errors_derive_from_one_base():
    from sstream.data import DatasetError
    from sstream.distributed import RankFailure
    from sstream.engine import UnsupportedModuleError
    from sstream.errors import SstreamError
    from sstream.io import ImageReadError
    from sstream.models import WeightsUnavailable
    from sstream.saliency import SaliencyOptionError
    from sstream.train import ResumeMismatch, TrainingError

    for error in (DatasetError, RankFailure, UnsupportedModuleError, ImageReadError,
                  WeightsUnavailable, SaliencyOptionError, ResumeMismatch, TrainingError):
        assert issubclass(error, SstreamError), error


def test_sstream_raises_no_plain_value_error():
    """Every ValueError sstream raises on purpose is an InputError, so that the CLI can tell
    a user's mistake (one line) from a bug (a traceback): a bare `raise ValueError(` in the
    package would be shown to users as a bug."""
    import sstream

    package = Path(sstream.__file__).parent
    bare = [f"{path.relative_to(package)}:{number}"
            for path in sorted(package.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if "raise ValueError(" in line]
    assert not bare, f"raise InputError (sstream.errors) instead: {bare}"
