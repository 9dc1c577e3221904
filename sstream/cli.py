"""The `sstream` command line: parse options, call the jobs, render results with rich.

Nothing here computes anything; every command is a thin wrapper over a function in the
package that can be called from Python as well. Errors a user can act on (bad files, bad
options) are printed as one line on stderr with a non-zero exit code; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

app = typer.Typer(
    name="sstream",
    help="Exact streaming training of CNNs on multi-megapixel and gigapixel images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad combination of options: exit code 2, like typer's own usage errors."""


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """Exact streaming training of CNNs on multi-megapixel and gigapixel images."""
    _state["debug"] = debug


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can act on into one line on stderr and a non-zero exit."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except (UsageError, typer.BadParameter) as exc:
        _fail(exc, EXIT_USAGE)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        _fail(exc, EXIT_FAILURE)


def _fail(exc: BaseException, code: int) -> None:
    if _state["debug"]:
        raise exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
        message = f"{message}: {exc.filename}"
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _not_implemented(command: str) -> None:
    err_console.print(f"sstream {command}: not implemented yet in this version.")
    raise typer.Exit(code=EXIT_FAILURE)


# ---- train ----------------------------------------------------------------------------------


@app.command()
def train() -> None:
    """Train a CNN end-to-end on whole images with image-level labels (streaming)."""
    _not_implemented("train")


# ---- predict --------------------------------------------------------------------------------


@app.command()
def predict() -> None:
    """Predict class probabilities for slides with a trained checkpoint."""
    _not_implemented("predict")


# ---- saliency -------------------------------------------------------------------------------


@app.command()
def saliency() -> None:
    """Write a full-resolution saliency map of a slide as a pyramidal TIFF and a PNG overview."""
    _not_implemented("saliency")


# ---- estimate-memory ------------------------------------------------------------------------


@app.command("estimate-memory")
def estimate_memory() -> None:
    """Estimate peak memory of conventional vs streaming training, and the tile that fits."""
    _not_implemented("estimate-memory")


# ---- make-sample-data -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:])

