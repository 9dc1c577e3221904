"""atomic_output: the target appears whole or not at all."""

import os
import stat

import pytest

from sstream.io import atomic_output


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        assert not target.exists()
        tmp.write_text("a,b\n")
    assert target.read_text() == "a,b\n"
    assert list(tmp_path.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_failure_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half of it")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_existing_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_output(target):
            pass
    with pytest.raises(ValueError):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_bytes(b"new but broken")
            raise ValueError
    assert target.read_bytes() == b"old"  # a failed overwrite keeps the previous file
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert list(tmp_path.iterdir()) == [target]


def test_target_appearing_during_write(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(FileExistsError, match="appeared"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"


def test_bad_targets(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "missing" / "x"):
            pass
    with pytest.raises(IsADirectoryError):
        with atomic_output(tmp_path):
            pass
