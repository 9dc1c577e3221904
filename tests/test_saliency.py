"""`sstream saliency`: full-resolution input-gradient maps, streamed and written tile by tile.

The written level-0 map equals plain autograd of the checkpoint's model on the whole image
(pixels / 255), reduced over colour channels by the method's rule; outputs are atomic; bad
inputs give one line and a non-zero exit.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from sstream.cli import app
from sstream.models import ModelConfig, build_model, checkpoint_payload, load_checkpoint
from sstream.saliency import (
    SaliencyOptionError,
    compute_saliency,
    default_output_paths,
    inferno,
    quantise,
)
from tests.conftest import relative_error

# `sstream.saliency` may be re-exported as the function, so reach the module explicitly.
saliency_module = importlib.import_module("sstream.saliency")

HEIGHT, WIDTH, TILE = 250, 300, 64  # not multiples of the tile; > 256: a 2-level pyramid
MPP = 0.5


@pytest.fixture(autouse=True)
def one_thread():
    """Small tiles on a shared machine run faster (and steadier) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(path: Path, **config: object) -> Path:
    """A random `tiny` model with non-trivial BatchNorm statistics, saved as a checkpoint."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", num_classes=3, **config))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    torch.save(checkpoint_payload(model), path)
    return path


def make_slide(path: Path, seed: int = 0) -> np.ndarray:
    """A random RGB image as a tiled TIFF (lossless) with a resolution of MPP."""
    rgb = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, tile=(48, 48), resolution=(1e4 / MPP, 1e4 / MPP),
                     resolutionunit="CENTIMETER")
    return rgb


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("saliency_inputs")
    make_slide(folder / "slide.tif")
    return {"slide": folder / "slide.tif", "checkpoint": make_checkpoint(folder / "ckpt.pt")}


def reference_map(checkpoint: Path, rgb: np.ndarray, class_index: int | None,
                  method: str) -> tuple[np.ndarray, int]:
    """Conventional autograd on the whole image: d logit / d (pixels / 255), reduced."""
    model = load_checkpoint(checkpoint)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255).requires_grad_()
    logits = model(x)
    k = int(logits.argmax()) if class_index is None else class_index
    logits[0, k].backward()
    grad = x.grad[0]  # (3, H, W)
    if method == "gradient":
        return grad.abs().amax(0).numpy(), k
    return (x.detach()[0] * grad).sum(0).numpy(), k


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Files in `folder` (hidden temporaries included) other than `keep`."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method, config, class_index", [
    ("gradient", {}, None),                                # global max pool head
    ("gradient-x-input", {}, 1),
    ("gradient", {"pooling": "avg"}, 0),                   # global average pool head
    ("gradient", {"pooling": "attention"}, 1),             # gated attention head
    ("gradient", {"stream_layers": "stage3"}, None),       # head with a conv stage: autograd
])
def test_level0_map_equals_whole_image_autograd(tmp_path: Path, method: str, config: dict,
                                                class_index: int | None) -> None:
    rgb = make_slide(tmp_path / "slide.tif", seed=1)
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", **config)
    result = compute_saliency(tmp_path / "slide.tif", checkpoint, tmp_path / "map.tif",
                              index=class_index, method=method, tile_size=TILE)
    expected, k = reference_map(checkpoint, rgb, class_index, method)
    written = tifffile.imread(tmp_path / "map.tif", level=0)
    assert written.dtype == np.float32 and written.shape == (HEIGHT, WIDTH)
    assert result.index == k and result.tiles > 4  # really tiled
    assert np.count_nonzero(expected) > 0
    assert relative_error(torch.from_numpy(written), torch.from_numpy(expected)) < 1e-4
    assert result.min == pytest.approx(float(written.min()))
    assert result.max == pytest.approx(float(written.max()))


def test_result_reports_prediction_and_progress(files: dict[str, Path], tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    result = compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                              tile_size=TILE, progress=lambda *call: calls.append(call))
    model = load_checkpoint(files["checkpoint"])
    rgb = tifffile.imread(files["slide"])
    with torch.no_grad():
        logits = model(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0]
    assert result.prediction["predicted_class"] == result.index == int(logits.argmax())
    assert np.allclose(result.prediction["probabilities"], torch.softmax(logits, 0).numpy(),
                       atol=1e-5)
    for phase in ("forward", "backward"):
        done = [d for p, d, _ in calls if p == phase]
        assert done == list(range(1, result.tiles + 1))
    assert all(total == result.tiles for _, _, total in calls)


# -- the TIFF: pyramid, resolution, uint8 --------------------------------------------------------


def test_map_is_a_pyramid_with_the_slides_resolution(files: dict[str, Path],
                                                     tmp_path: Path) -> None:
    result = compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                              tile_size=TILE)
    assert result.mpp == pytest.approx(MPP) and result.size == (WIDTH, HEIGHT)
    with tifffile.TiffFile(tmp_path / "map.tif") as tif:
        level0 = tif.pages[0]
        assert level0.is_tiled and level0.shape == (HEIGHT, WIDTH)
        x_resolution = level0.tags["XResolution"].value
        assert level0.tags["ResolutionUnit"].value == 3  # centimetre
        assert 1e4 / (x_resolution[0] / x_resolution[1]) == pytest.approx(MPP)
        assert [lv.shape for lv in tif.series[0].levels] == [(250, 300), (125, 150)]
        record = json.loads(level0.description)
    assert record["encoding"] == "float32" and record["class"] == result.index
    assert record["method"] == "gradient"


def test_uint8_map_records_its_percentile_scale(files: dict[str, Path], tmp_path: Path) -> None:
    compute_saliency(files["slide"], files["checkpoint"], tmp_path / "f.tif", tile_size=TILE,
                     method="gradient-x-input")
    result = compute_saliency(files["slide"], files["checkpoint"], tmp_path / "q.tif",
                              tile_size=TILE, method="gradient-x-input", uint8=True,
                              percentile=99.0)
    values = tifffile.imread(tmp_path / "f.tif")
    with tifffile.TiffFile(tmp_path / "q.tif") as tif:
        q = tif.pages[0].asarray()
        record = json.loads(tif.pages[0].description)
        assert len(tif.series[0].levels) == 2
    assert q.dtype == np.uint8 and result.encoding == "uint8"
    # the scale: the 99th percentile of the non-zero |values|, to within a histogram bin
    exact = np.percentile(np.abs(values[values != 0]), 99.0)
    assert record["scale"] == pytest.approx(result.scale)
    assert exact <= result.scale <= exact * 2 ** (1 / 32) * 1.0001
    # signed map: offset 128, value ~ (q - offset) * step where |value| <= scale
    assert record["offset"] == 128 and record["step"] == pytest.approx(result.scale / 127)
    inside = np.abs(values) <= result.scale
    decoded = (q.astype(np.float64) - record["offset"]) * record["step"]
    assert np.abs(decoded - values)[inside].max() <= record["step"] / 2 * 1.001
    assert (q[values > result.scale] == 255).all() and (q[values < -result.scale] == 1).all()


def test_quantise_rules() -> None:
    values = np.array([0.0, 0.5, 1.0, 2.0, -0.5, -3.0], np.float32)
    assert quantise(values[:4], 1.0, signed=False).tolist() == [0, 128, 255, 255]
    assert quantise(values, 1.0, signed=True).tolist() == [128, 192, 255, 255, 64, 1]
    assert quantise(values, 0.0, signed=False).tolist() == [0] * 6


# -- the overview ---------------------------------------------------------------------------------


def test_overview_png_overlays_the_slide_with_a_colour_bar(files: dict[str, Path],
                                                           tmp_path: Path) -> None:
    result = compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                              overview=tmp_path / "map.png", tile_size=TILE)
    assert result.overview == tmp_path / "map.png"
    with Image.open(tmp_path / "map.png") as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.height >= HEIGHT and png.width > WIDTH  # the slide, then the colour bar
        picture = np.asarray(png)
    slide = tifffile.imread(files["slide"]).astype(int)
    changed = np.abs(picture[:HEIGHT, :WIDTH].astype(int) - slide).max(axis=2)
    saliency = tifffile.imread(tmp_path / "map.tif")
    assert (changed[saliency == 0] == 0).all()  # no saliency: the slide shows unchanged
    assert (changed[saliency >= result.scale] > 0).all()


def test_block_max_overview_carries_rows_across_bands() -> None:
    rng = np.random.default_rng(0)
    full = rng.normal(size=(103, 57)).astype(np.float32)
    overview = saliency_module._BlockMaxOverview(103, 57, factor=5)
    y = 0
    for height in (1, 7, 4, 30, 2, 59):  # arbitrary band heights
        overview.add(full[y:y + height])
        y += height
    overview.finish()
    padded = np.zeros((105, 60), np.float32)
    padded[:103, :57] = np.abs(full)
    assert np.array_equal(overview.image, padded.reshape(21, 5, 12, 5).max(axis=(1, 3)))


def test_inferno_is_dark_to_bright() -> None:
    colours = inferno(np.linspace(0, 1, 256)).astype(int)
    assert colours.shape == (256, 3)
    luminance = colours @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(luminance) > -1).all() and luminance[0] < 10 and luminance[-1] > 230


def test_default_output_paths() -> None:
    assert default_output_paths("/data/a.b.svs") == (Path("/data/a.saliency.tif"),
                                                     Path("/data/a.saliency.png"))
    assert default_output_paths("a.tif", "out/m.tiff") == (Path("out/m.tiff"),
                                                           Path("out/m.png"))


# -- refusals and atomic outputs ------------------------------------------------------------------


def test_existing_outputs_are_refused_unless_overwrite(files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    (tmp_path / "map.tif").write_bytes(b"precious")
    calls = []
    with pytest.raises(FileExistsError, match="already exists"):
        compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                         tile_size=TILE, progress=lambda *c: calls.append(c))
    assert calls == []  # refused before computing anything
    assert (tmp_path / "map.tif").read_bytes() == b"precious"
    (tmp_path / "new.png").write_bytes(b"precious")  # the overview exists, the map does not
    with pytest.raises(FileExistsError, match="new.png"):
        compute_saliency(files["slide"], files["checkpoint"], tmp_path / "new.tif",
                         overview=tmp_path / "new.png", overwrite=False)
    compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                     overview=tmp_path / "new.png", tile_size=TILE, overwrite=True)
    assert tifffile.imread(tmp_path / "map.tif").shape == (HEIGHT, WIDTH)
    assert leftovers(tmp_path, {"map.tif", "new.png"}) == []


@pytest.mark.parametrize("uint8", [False, True])
def test_failure_mid_way_leaves_no_file(files: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, uint8: bool) -> None:
    emit = saliency_module._MapBands._emit
    calls = {"n": 0}

    def failing_emit(self: object, y0: int, rows: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        emit(self, y0, rows)

    monkeypatch.setattr(saliency_module._MapBands, "_emit", failing_emit)
    with pytest.raises(RuntimeError, match="disk on fire"):
        compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                         overview=tmp_path / "map.png", tile_size=TILE, uint8=uint8)
    assert calls["n"] == 3
    assert leftovers(tmp_path, set()) == []


def test_class_index_out_of_range(files: dict[str, Path], tmp_path: Path) -> None:
    for bad in (3, -1):
        with pytest.raises(SaliencyOptionError, match=r"class .* out of range.*0\.\.2"):
            compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                             index=bad)
    with pytest.raises(SaliencyOptionError, match="unknown method"):
        compute_saliency(files["slide"], files["checkpoint"], tmp_path / "map.tif",
                         method="smoothgrad")
    assert leftovers(tmp_path, set()) == []


def test_unwritable_destinations(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_saliency(files["slide"], files["checkpoint"], tmp_path / "no" / "map.tif")
    with pytest.raises(IsADirectoryError):
        compute_saliency(files["slide"], files["checkpoint"], tmp_path)
    (tmp_path / "file").touch()
    with pytest.raises(OSError):
        compute_saliency(files["slide"], files["checkpoint"], tmp_path / "file" / "map.tif")


# -- command line ----------------------------------------------------------------------------------


def run_cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["saliency", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_cli_writes_map_and_overview(files: dict[str, Path], tmp_path: Path) -> None:
    code, stdout, _ = run_cli(files["slide"], "--checkpoint", files["checkpoint"], "--class", 1,
                              "--out", tmp_path / "s.tif", "--tile-size", TILE, "--uint8")
    assert code == 0, stdout
    assert "class 1" in stdout and "s.tif" in stdout
    assert tifffile.imread(tmp_path / "s.tif").dtype == np.uint8
    assert (tmp_path / "s.png").is_file()  # the overview follows --out by default
    assert leftovers(tmp_path, {"s.tif", "s.png"}) == []


@pytest.mark.parametrize("case, code, message", [
    ("missing slide", 1, "no such file"),
    ("not an image", 1, "slide.txt"),
    ("bad checkpoint", 1, "not a readable checkpoint"),
    ("class out of range", 2, "class 9 out of range"),
    ("unknown method", 2, "unknown method"),
    ("level and mpp", 2, "not both"),
    ("existing output", 1, "already exists"),
    ("missing directory", 1, "does not exist"),
])
def test_cli_errors_are_one_line(files: dict[str, Path], tmp_path: Path, case: str, code: int,
                                 message: str) -> None:
    slide, checkpoint, out = files["slide"], files["checkpoint"], tmp_path / "m.tif"
    extra: list[object] = []
    if case == "missing slide":
        slide = tmp_path / "absent.tif"
    elif case == "not an image":
        slide = tmp_path / "slide.txt"
        slide.write_text("hello")
    elif case == "bad checkpoint":
        checkpoint = tmp_path / "ckpt.pt"
        checkpoint.write_bytes(b"\x00" * 100)
    elif case == "class out of range":
        extra = ["--class", 9]
    elif case == "unknown method":
        extra = ["--method", "occlusion"]
    elif case == "level and mpp":
        extra = ["--level", 0, "--mpp", 0.5]
    elif case == "existing output":
        out.write_bytes(b"keep")
    elif case == "missing directory":
        out = tmp_path / "absent" / "m.tif"
    before = set(p.name for p in tmp_path.iterdir())
    exit_code, stdout, stderr = run_cli(slide, "-c", checkpoint, "-o", out, *extra)
    assert exit_code == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert set(p.name for p in tmp_path.iterdir()) == before  # nothing written
