"""The package surface: top-level names, the command list, `python -m sstream`."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import sstream
from sstream.cli import app


def test_top_level_names_resolve_to_the_jobs():
    from sstream.estimate import estimate_memory
    from sstream.models import load_checkpoint
    from sstream.saliency import compute_saliency

    assert sstream.load_checkpoint is load_checkpoint
    assert sstream.estimate_memory is estimate_memory
    assert callable(sstream.saliency) and sstream.saliency.compute_saliency is compute_saliency
    assert issubclass(sstream.UnsupportedModuleError, ValueError)


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "predict", "saliency", "view", "verify", "info", "tissue",
                    "estimate-memory", "make-sample-data"):
        assert command in result.output


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "sstream", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "estimate-memory" in result.stdout
