"""The command-line reference, docs/cli.md, generated from the Typer app itself.

    python -m sstream.cli_docs > docs/cli.md

Each command gets its help text, its usage line and one table row per visible option or
argument (names, type, default, help), in the order `--help` shows them. The file is
generated, never edited: tests/test_cli_docs.py fails when it differs from what this prints,
so a changed option cannot leave the reference behind.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import typer
import typer.core
from rich.text import Text

from sstream.cli import app

HEADER = """# sstream command-line reference

Generated from the Typer app by `python -m sstream.cli_docs > docs/cli.md`; do not edit by
hand (`tests/test_cli_docs.py` fails when this file is stale). `sstream COMMAND -h` prints the
same at the terminal.
"""


def cli_reference() -> str:
    """docs/cli.md's Markdown: the global options, then every command in `--help`'s order."""
    group = typer.main.get_command(app)
    root = typer.Context(group, info_name="sstream")
    sections = [HEADER, _section("sstream", group, root)]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        sections.append(_section(f"sstream {name}", command,
                                 typer.Context(command, info_name=name, parent=root)))
    return "\n".join(sections)


def _section(title: str, command: Any, ctx: typer.Context) -> str:
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## `{title}`", "", _plain(command.help or ""), "", "```",
             f"{ctx.command_path} {usage}".rstrip(), "```", "",
             "| option | type | default | |", "|---|---|---|---|"]
    lines += [_row(param, ctx) for param in command.get_params(ctx) if not param.hidden]
    return "\n".join(lines) + "\n"


def _row(param: Any, ctx: typer.Context) -> str:
    names = ", ".join(param.opts + param.secondary_opts)
    if isinstance(param, typer.core.TyperArgument):
        names = param.name.upper()
    kind = param.display_type_rich(ctx) or ""
    help_text = _plain(param.help or "")
    if getattr(param, "envvar", None):
        help_text += f" (environment: `{param.envvar}`)"
    if param.required:
        help_text += " Required."
    cells = [f"`{names}`", f"`{kind}`" if kind else "", _default(param), help_text]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _default(param: Any) -> str:
    if isinstance(param.show_default, str):
        return _plain(param.show_default)
    default = param.default
    if param.required or default is None or default == []:
        return ""
    if getattr(param, "is_flag", False):
        if param.secondary_opts:
            return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
        return ""
    if isinstance(default, (list, tuple)):
        return " ".join(f"`{value}`" for value in default)
    return f"`{default}`"


def _plain(text: str) -> str:
    """Help text as the terminal shows it (rich markup resolved), on one line per paragraph."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    text = "\n\n".join(" ".join(Text.from_markup(p).plain.split()) for p in paragraphs)
    return re.sub(r"(?<!`)(\S*<[^<>`\s]+>\S*)", r"`\1`", text)  # <name> is not HTML


if __name__ == "__main__":
    print(cli_reference(), end="")
