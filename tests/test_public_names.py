"""What crosses a module boundary inside sstream has a public name."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil

import pytest

import sstream


def _modules() -> list[str]:
    return ["sstream", *(info.name for info in pkgutil.walk_packages(sstream.__path__,
                                                                     "sstream."))]


def _private_imports(module: str) -> list[str]:
    """`from sstream.x import _name` in `module`, at any depth (lazy and type-only too)."""
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    return [f"{node.module}.{alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sstream")
            for alias in node.names
            if alias.name.startswith("_") and not alias.name.startswith("__")]


@pytest.mark.parametrize("module", _modules())
def test_no_module_imports_a_private_name_of_another(module):
    assert _private_imports(module) == []


def test_the_check_sees_a_private_import(tmp_path, monkeypatch):
    (tmp_path / "leaky.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from sstream.engine.streaming import _NO_TENSOR\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _private_imports("leaky") == ["sstream.engine.streaming._NO_TENSOR"]
