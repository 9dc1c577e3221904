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
    assert issubclass(sstream.UnsupportedModuleError, sstream.SstreamError)


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


# sstream.tissue is not among them: its Tissue choice serves train, predict and saliency
JOBS = ("train", "predict", "saliency", "heatmap", "estimate", "verify", "view", "split",
        "report", "info", "sample_data")


def _sstream_imports(module: str) -> set[str]:
    """The sstream modules a module imports, at any depth in its code (lazy imports too)."""
    import ast
    import importlib.util

    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
              for alias in node.names}
    return {name for name in names if name and name.split(".")[0] == "sstream"}


def test_jobs_never_import_each_other():
    for job in JOBS:
        others = {f"sstream.{other}" for other in JOBS if other != job}
        assert not _sstream_imports(f"sstream.{job}") & others, job


def test_the_training_pieces_import_no_other_job():
    """sstream.training holds the train job's pieces: they import no other job (and
    sstream.train only for its TrainConfig's type)."""
    import pkgutil

    import sstream.training

    others = {f"sstream.{job}" for job in JOBS if job != "train"}
    for info in pkgutil.iter_modules(sstream.training.__path__):
        module = f"sstream.training.{info.name}"
        assert not _sstream_imports(module) & others, module


def test_engine_and_io_import_nothing_above_them():
    import pkgutil

    import sstream.engine
    import sstream.io

    for package, allowed in ((sstream.engine, ("sstream.engine", "sstream.errors")),
                             (sstream.io, ("sstream.io", "sstream.errors"))):
        for info in pkgutil.iter_modules(package.__path__):
            module = f"{package.__name__}.{info.name}"
            above = {name for name in _sstream_imports(module) if not name.startswith(allowed)}
            assert not above, (module, above)
