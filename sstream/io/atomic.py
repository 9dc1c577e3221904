"""Atomic file output: write to a temporary sibling, rename onto the target on success.

Every file sstream produces (pyramidal TIFFs, checkpoints, CSVs, PNGs) goes through
`atomic_output`, so an interrupted job never leaves a file that looks complete: the target
path either does not exist, keeps its previous content (when overwriting), or holds the
whole new file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.

    The temporary file lives in the same directory as `path` (so the final `os.replace` is an
    atomic rename on one filesystem) and is named `.<name>.<random>.tmp`; it is created empty,
    and the body may overwrite it or write it in place. If the body raises, the temporary file
    is deleted and the exception propagates; `path` is left untouched.

    Args:
        path: the final file path. Its parent directory must exist.
        overwrite: replace an existing `path`; otherwise refuse to start.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False (checked before and again
            just before the rename).
        FileNotFoundError: the parent directory of `path` does not exist.
        IsADirectoryError: `path` is an existing directory.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: is a directory, cannot write a file there")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target}: already exists (use --overwrite, or overwrite=True, to replace it)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{target}: parent directory {parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the file the mode an ordinary open() would (or the mode of
    # the file it replaces)
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
    os.chmod(tmp, mode)
    try:
        yield tmp
        _fsync_file(tmp)
        if not overwrite and target.exists():
            raise FileExistsError(
                f"{target}: appeared while it was being written (use --overwrite)"
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(parent)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (FileNotFoundError if the body removed it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in `directory` (best effort: not every OS can fsync directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
