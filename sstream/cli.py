"""The `sstream` command line: parse options, call the jobs, render results with rich.

Nothing here computes anything; every command is a thin wrapper over a function in the
package that can be called from Python as well.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sstream",
    help="Exact streaming training of CNNs on multi-megapixel and gigapixel images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _not_implemented(command: str) -> None:
    typer.echo(f"sstream {command}: not implemented yet in this version.", err=True)
    raise typer.Exit(code=1)


@app.command()
def train() -> None:
    """Train a CNN end-to-end on whole images with image-level labels (streaming)."""
    _not_implemented("train")


@app.command()
def predict() -> None:
    """Predict class probabilities for slides with a trained checkpoint."""
    _not_implemented("predict")


@app.command()
def saliency() -> None:
    """Write a full-resolution saliency map of a slide as a pyramidal TIFF and a PNG overview."""
    _not_implemented("saliency")


@app.command("estimate-memory")
def estimate_memory() -> None:
    """Estimate peak memory of conventional vs streaming training, and the tile that fits."""
    _not_implemented("estimate-memory")


def main() -> None:
    """Console-script entry point."""
    app()
