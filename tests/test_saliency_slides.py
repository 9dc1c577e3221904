"""`sstream saliency` over several slides or a CSV: one map per slide in an output folder,
each equal to the single-slide command's; an unreadable slide is reported and skipped.
(Two ranks under torchrun: tests/test_distributed.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from sstream.cli import app
from tests.test_saliency import (  # one_thread: one torch thread, as there
    TILE,
    make_checkpoint,
    make_slide,
    one_thread,  # noqa: F401
)

SLIDES = ("a.tif", "b.tif", "c.tif")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three slides, a checkpoint and `list.csv` naming the slides (with a label column,
    which saliency ignores)."""
    folder = tmp_path_factory.mktemp("cohort")
    for seed, name in enumerate(SLIDES):
        make_slide(folder / name, seed=seed)
    make_checkpoint(folder / "ckpt.pt")
    (folder / "list.csv").write_text("image,label\n" + "".join(f"{name},{i}\n" for i, name
                                                               in enumerate(SLIDES)))
    return folder


def run_cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["saliency", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_a_csv_writes_the_single_slide_commands_maps(cohort: Path, tmp_path: Path) -> None:
    common = ("-c", cohort / "ckpt.pt", "--tile-size", TILE, "--device", "cpu", "--class", 1)
    code, stdout, stderr = run_cli("--csv", cohort / "list.csv", "--out", tmp_path / "maps",
                                   *common)
    assert code == 0, stderr
    assert "3 of 3 maps written" in stdout
    for position, name in enumerate(SLIDES):  # a progress line per slide
        assert f"[{position + 1}/3] {name}: class 1" in stderr
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "a.png", "a.tif", "b.png", "b.tif", "c.png", "c.tif"]
    for name in SLIDES:
        single = tmp_path / f"single-{name}"
        assert run_cli(cohort / name, "--out", single, *common)[0] == 0
        batch = tmp_path / "maps" / name
        assert np.array_equal(tifffile.imread(batch), tifffile.imread(single))
        with tifffile.TiffFile(batch) as mapped, tifffile.TiffFile(single) as alone:
            assert mapped.pages[0].description == alone.pages[0].description
        assert batch.with_suffix(".png").read_bytes() == single.with_suffix(".png").read_bytes()


def test_an_unreadable_slide_is_reported_and_the_others_mapped(cohort: Path,
                                                               tmp_path: Path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_text("not a slide")
    code, stdout, stderr = run_cli(cohort / "a.tif", tmp_path / "absent.tif", broken,
                                   cohort / "c.tif", "-c", cohort / "ckpt.pt", "--out",
                                   tmp_path / "maps", "--tile-size", TILE, "--device", "cpu",
                                   "--no-overview", "--uint8")
    assert code == 1
    assert "2 of 4 maps written" in stdout
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "absent.tif" in errors[0] and "broken.tif" in errors[1]
    assert "[2/4] " in stderr and "skipped" in stderr
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a.tif", "c.tif"]
    assert tifffile.imread(tmp_path / "maps" / "c.tif").dtype == np.uint8


def test_maps_go_beside_their_slides_without_out(cohort: Path, tmp_path: Path) -> None:
    for name in SLIDES[:2]:
        (tmp_path / name).write_bytes((cohort / name).read_bytes())
    code, _, stderr = run_cli(tmp_path / "a.tif", tmp_path / "b.tif", "-c",
                              cohort / "ckpt.pt", "--tile-size", TILE, "--device", "cpu")
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.saliency.png", "a.saliency.tif", "a.tif", "b.saliency.png", "b.saliency.tif",
        "b.tif"]


@pytest.mark.parametrize("case, code, message", [
    ("slides and csv", 2, "not both"),
    ("no slides", 2, "no slides given"),
    ("overview", 2, "--out names their folder"),
    ("geojson", 2, "--out names their folder"),
    ("one stem twice", 1, "would both write"),
    ("existing map", 1, "already exists"),
    ("out is a file", 1, "is a file"),
    ("one mask for several", 1, "mask of one slide"),
])
def test_refusals_are_one_line_and_write_nothing(cohort: Path, tmp_path: Path, case: str,
                                                 code: int, message: str) -> None:
    out = tmp_path / "maps"
    args: list[object] = [cohort / "a.tif", cohort / "b.tif"]
    if case == "slides and csv":
        args += ["--csv", cohort / "list.csv"]
    elif case == "no slides":
        args = []
    elif case == "overview":
        args += ["--overview", tmp_path / "o.png"]
    elif case == "geojson":
        args += ["--geojson", tmp_path / "a.geojson"]
    elif case == "one stem twice":
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "a.tif").write_bytes((cohort / "a.tif").read_bytes())
        args.append(tmp_path / "other" / "a.tif")
    elif case == "existing map":  # refused before the first slide is mapped
        out.mkdir()
        (out / "b.tif").write_bytes(b"keep")
    elif case == "out is a file":
        out.write_bytes(b"keep")
    elif case == "one mask for several":
        mask = tmp_path / "mask.png"
        mask.write_bytes((cohort / "a.tif").read_bytes())
        args += ["--tissue", mask]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    exit_code, _, stderr = run_cli(*args, "-c", cohort / "ckpt.pt", "--out", out,
                                   "--tile-size", TILE, "--device", "cpu")
    assert exit_code == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
