"""benchmarks/gpu_check.py runs every section at toy sizes on the CPU, so it cannot rot
before the next time a GPU is at hand."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_writes_its_table(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    sections = {row[0] for row in rows}
    assert {"tests", "float64", "fp16 AMP", "ResNet-34", "decode", "predict",
            "nvJPEG"} <= sections
    assert not any(row[3].startswith("FAIL") for row in rows)
    assert "| float64 |" in (tmp_path / "gpu_check.md").read_text()
