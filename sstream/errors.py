"""The base of every error sstream raises on purpose, for its users to act on.

An `SstreamError` means "the input or the options cannot work, and the message says why and
what to do": the CLI prints its message as one line. Any other exception escaping a job is a
bug in sstream, and the CLI shows its traceback with a request to report it.

This module imports nothing, so that every layer (the engine, io, the jobs) can derive its
errors from it without importing anything above itself. The subclasses keep the built-in
base they had before (ValueError, RuntimeError) so that callers catching those still do.
"""

from __future__ import annotations


class SstreamError(Exception):
    """An error a user can act on: bad input, options that cannot work, a failed run."""


class InputError(SstreamError, ValueError):
    """A value sstream was given that cannot work (an option, a CSV cell, a file's contents),
    with a message naming it. It is a ValueError too, so code that validated with
    `except ValueError` before keeps working; a plain ValueError from elsewhere is a bug."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): how
    a cause is quoted inside sstream's own one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
