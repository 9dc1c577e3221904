"""Broken inputs through the CLI: truncated and bit-flipped checkpoints, CSVs and TIFFs.

Every case ends in one of two ways: a non-zero exit with a short one-line error, no
traceback and no output written; or, where the damage left a file that is still valid
(a CSV label digit flipped, JPEG data decoding to other pixels), success with a complete
output. A checkpoint always ends the first way unless its contents are untouched (a flipped
byte the loader never reads): its tensors and values carry a digest, so it never loads
silently with other weights. Seeded: the same damage every run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sstream.cli import app
from sstream.io import write_synthetic_slide
from sstream.models import ModelConfig, build_model, checkpoint_payload, seal

runner = CliRunner()
DAMAGES = 12  # per file: seeded bit flips and truncations


def damaged(data: bytes, seed: int) -> bytes:
    """`data` truncated (one case in three) or with 1-3 bits flipped, by the seed."""
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:
        return data[:int(rng.integers(0, len(data)))]
    flipped = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        position = int(rng.integers(0, len(flipped)))
        flipped[position] ^= 1 << int(rng.integers(0, 8))
    return bytes(flipped)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    torch.save(seal(checkpoint_payload(build_model(ModelConfig("tiny")).eval())),
               root / "model.pt")
    write_synthetic_slide(root / "slide.tif", 96, 1, seed=1, tile=32)
    with open(root / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "label"], ["slide.tif", "1"]])
    return root


def run(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: uncaught {result.exception!r}\n{result.output}")
    return result.exit_code, result.output


def assert_clean_failure_or_success(code: int, output: str, written: list[Path]) -> None:
    assert "Traceback" not in output
    if code == 0:
        assert all(path.exists() and path.stat().st_size for path in written), output
        return
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) < 500, output  # (progress lines may precede)
    assert not any(path.exists() for path in written), output
    leftovers = [p.name for p in written[0].parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers  # no temporary files left behind


@pytest.mark.parametrize("seed", range(DAMAGES))
def test_a_damaged_checkpoint_is_refused_never_used(files, tmp_path, seed):
    (tmp_path / "bad.pt").write_bytes(damaged((files / "model.pt").read_bytes(), seed))
    out = tmp_path / "preds.csv"
    code, output = run(["predict", "--checkpoint", str(tmp_path / "bad.pt"),
                        str(files / "slide.tif"), "--out", str(out), "--tile-size", "32",
                        "--device", "cpu", "--quiet"])
    if code == 0:  # only where the damage missed every byte the loader reads
        clean = tmp_path / "clean.csv"
        assert run(["predict", "--checkpoint", str(files / "model.pt"),
                    str(files / "slide.tif"), "--out", str(clean), "--tile-size", "32",
                    "--device", "cpu", "--quiet"])[0] == 0
        assert out.read_text() == clean.read_text(), "loaded with other weights"
        return
    assert_clean_failure_or_success(code, output, [out])


@pytest.mark.parametrize("seed", range(DAMAGES))
def test_a_damaged_csv_is_refused_or_read_whole(files, tmp_path, seed):
    text = (files / "list.csv").read_bytes()
    (tmp_path / "list.csv").write_bytes(damaged(text, seed))
    (tmp_path / "slide.tif").symlink_to(files / "slide.tif")
    out = tmp_path / "preds.csv"
    code, output = run(["predict", "--checkpoint", str(files / "model.pt"), "--csv",
                        str(tmp_path / "list.csv"), "--out", str(out), "--tile-size", "32",
                        "--device", "cpu", "--quiet"])
    assert_clean_failure_or_success(code, output, [out])


@pytest.mark.parametrize("seed", range(DAMAGES))
def test_a_damaged_slide_is_refused_or_read_whole(files, tmp_path, seed):
    (tmp_path / "slide.tif").write_bytes(damaged((files / "slide.tif").read_bytes(), seed))
    out = tmp_path / "map.tif"
    code, output = run(["saliency", str(tmp_path / "slide.tif"), "--checkpoint",
                        str(files / "model.pt"), "--out", str(out), "--overview",
                        str(tmp_path / "map.png"), "--tile-size", "32", "--device", "cpu"])
    if code == 0:
        output = output.splitlines()[-1]  # success prints its summary
    assert_clean_failure_or_success(code, output if code else "", [out, tmp_path / "map.png"])
