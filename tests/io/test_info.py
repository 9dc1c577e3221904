"""`sstream info`: a slide's format, backend, levels, resolution, objective and associated
images, as a table, as JSON, and a thumbnail."""

import json

import numpy as np
import pytest
from conftest import H, W, rgb_image, write_layout
from PIL import Image
from typer.testing import CliRunner

from sstream.cli import app
from sstream.io.info import slide_info

runner = CliRunner()


@pytest.fixture
def svs(tmp_path):
    path = tmp_path / "slide.svs"
    write_layout(path, "svs", rgb_image())
    return path


@pytest.mark.parametrize("backend, name", [("tifffile", "svs"), ("openslide", "aperio")])
def test_an_aperio_slide_described_by_either_backend(svs, backend, name):
    pytest.importorskip("openslide") if backend == "openslide" else None
    info = slide_info(svs, mpp=1.0, backend=backend)
    assert (info.format, info.backend) == (name, backend)
    assert [(lv.width, lv.height) for lv in info.levels] == [(W, H), (205, 150), (103, 75)]
    assert info.mpp == pytest.approx(0.499) and info.objective_power == 20
    assert info.levels[1].mpp == pytest.approx(0.499 * info.levels[1].downsample)
    assert info.chosen_level == 1  # 0.998 µm/px: the coarsest not coarser than 1.0
    thumbnail = (-(-W // 8), -(-H // 8))
    assert info.associated == {"thumbnail": thumbnail, "label": thumbnail,
                               "macro": thumbnail}
    assert info.file_bytes == svs.stat().st_size


def test_the_command_prints_a_table_json_and_a_thumbnail(svs, tmp_path):
    done = runner.invoke(app, ["info", str(svs), "--mpp", "1"], env={"COLUMNS": "80"})
    assert done.exit_code == 0, done.output
    assert "…" not in done.output and max(map(len, done.output.splitlines())) <= 80
    for text in ("svs read by tifffile", "0.499", "20x objective", "label 52 x 38",
                 "--mpp reads level 1", "205"):
        assert text in done.output, text
    done = runner.invoke(app, ["info", str(svs), str(svs), "--json"])
    records = json.loads(done.output)
    assert [r["levels"][2]["width"] for r in records] == [103, 103]
    out = tmp_path / "thumb.png"
    done = runner.invoke(app, ["info", str(svs), "--thumbnail", str(out), "--max-side", "100"])
    assert done.exit_code == 0, done.output
    thumb = np.asarray(Image.open(out))
    assert thumb.shape == (73, 100, 3)  # 300 x 410 scaled to 100 px wide
    assert abs(thumb.astype(int).mean() - rgb_image()[::4, ::4].mean()) < 10


def test_bad_uses_get_one_line(svs, tmp_path):
    done = runner.invoke(app, ["info", str(svs), str(svs), "--thumbnail", str(tmp_path / "t.png")])
    assert done.exit_code == 2 and "give one slide" in done.output
    (tmp_path / "notes.txt").write_text("not a slide")
    done = runner.invoke(app, ["info", str(tmp_path / "notes.txt")])
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert len(done.output.strip().splitlines()) == 1
    done = runner.invoke(app, ["--backend", "vips", "info", str(svs)])
    assert done.exit_code == 2 and "--backend must be one of" in done.output
