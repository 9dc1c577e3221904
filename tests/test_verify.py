"""`sstream verify`: one step both ways, side by side, and a verdict that can fail."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

import sstream.verify
from sstream.cli import app
from sstream.verify import VerifyConfig, verify

runner = CliRunner()


def test_streaming_agrees_with_plain_backprop_to_float64_precision():
    result = verify(VerifyConfig("tiny", (96, 80), 32, dtype="float64"))
    assert result.passed and result.path == "whole-slide" and result.verified_size == (96, 80)
    assert result.output_error < 1e-12 and result.input_grad_error < 1e-12
    assert len(result.param_errors) == 14 and max(result.param_errors.values()) < 1e-12
    assert all(s > 0 for s in result.seconds) and all(b > 0 for b in result.peak_bytes)


def test_the_table_fits_80_columns_and_json_has_every_gradient():
    done = runner.invoke(app, ["verify", "--model", "tiny", "--size", "80x96",
                               "--tile-size", "32", "--stream-layers", "stage3"],
                         env={"COLUMNS": "80"})
    assert done.exit_code == 0, done.output
    assert "feature map path" in done.output and "ok" in done.output
    assert max(len(line) for line in done.output.splitlines()) <= 80
    assert "…" not in done.output
    payload = json.loads(runner.invoke(app, ["verify", "--model", "tiny", "--size", "64",
                                             "--tile-size", "32", "--json"]).stdout)
    assert payload["passed"] and payload["verified_size"] == [64, 64]
    assert set(payload["param_errors"]) == {
        "stream.stage1.0.weight", "stream.stage1.1.weight", "stream.stage1.1.bias",
        "stream.stage2.0.weight", "stream.stage2.1.weight", "stream.stage2.1.bias",
        "stream.stage3.0.weight", "stream.stage3.1.weight", "stream.stage3.1.bias",
        "stream.stage4.0.weight", "stream.stage4.1.weight", "stream.stage4.1.bias",
        "head.fc.weight", "head.fc.bias"}


def test_a_difference_beyond_the_tolerance_fails(monkeypatch):
    """The verdict is not decoration: a streamed step off by 1e-6 fails float64."""
    original = sstream.verify.streamed_logits
    monkeypatch.setattr(sstream.verify, "streamed_logits",
                        lambda *args, **kwargs: original(*args, **kwargs) * (1 + 1e-6))
    done = runner.invoke(app, ["verify", "--model", "tiny", "--size", "64", "--tile-size",
                               "32"])
    assert done.exit_code == 1 and "over tolerance" in done.output


def test_too_large_for_conventional_training_verifies_a_crop_and_says_so():
    result = verify(VerifyConfig("tiny", (512, 384), 64), memory=2**20)
    assert result.passed and result.verified_size < (512, 384)
    assert "verified on a centred" in result.cropped_because


def test_an_image_instead_of_noise(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    result = verify(VerifyConfig("tiny", (64, 64), 32, image=str(tmp_path / "a.png")))
    assert result.passed
    done = runner.invoke(app, ["verify", "--model", "tiny", "--image",
                               str(tmp_path / "none.png")])
    assert done.exit_code == 1 and "none.png" in done.output
    assert torch.get_default_dtype() == torch.float32
