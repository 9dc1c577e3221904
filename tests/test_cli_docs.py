"""docs/cli.md is what `python -m sstream.cli_docs` prints from the app: never stale."""

from __future__ import annotations

from pathlib import Path

from sstream.cli_docs import cli_reference

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_the_cli_reference_is_current():
    assert REFERENCE.read_text() == cli_reference(), (
        "docs/cli.md is stale: regenerate it with `python -m sstream.cli_docs > docs/cli.md` "
        "(or `make docs`)")


def test_the_reference_lists_every_command_and_visible_option():
    from sstream.cli import app

    text = cli_reference()
    for command in ("train", "predict", "saliency", "verify", "info", "estimate-memory"):
        assert f"## `sstream {command}`" in text
    assert "`--memory-budget`" in text and "`--budget`" not in text  # hidden aliases stay out
    assert "<bool>" not in text and app.info.help in text
