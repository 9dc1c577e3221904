"""One source per option: every job's configuration dataclass declares its options (default
and help), and the command line says the same.

The CLI declares its options itself (deriving them would import torch, through the jobs, on
every `sstream` start), so these tests hold the two together: for the command of every job
with a configuration (JOBS), each option's default, help and shown default equal its
field's, and each field has an option, except the ones listed in JOBS with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import click
import pytest
import typer

from sstream.cli import _parse_size, app
from sstream.estimate import EstimateConfig
from sstream.heatmap import HeatmapConfig
from sstream.info import InfoConfig
from sstream.options import Options, option, option_default, option_field
from sstream.predict import PredictConfig
from sstream.report import ReportConfig
from sstream.saliency import SaliencyConfig
from sstream.sample_data import SampleDataConfig
from sstream.split import SplitConfig
from sstream.tissue import TissueConfig
from sstream.train import TrainConfig
from sstream.verify import VerifyConfig
from sstream.view import ViewConfig


@dataclass(frozen=True)
class Job:
    """A command, its configuration, and where the two deliberately differ."""

    config: type
    cli_only: frozenset[str] = frozenset()     # options that are no setting of the job
    field_only: frozenset[str] = frozenset()   # settings the command line gives another way
    renamed: dict[str, str] = field(default_factory=dict)   # CLI parameter -> field
    parsed: dict[str, Callable] = field(default_factory=dict)  # CLI text -> field value


JOBS = {
    "train": Job(TrainConfig, cli_only=frozenset({
        "config", "resume", "overwrite",   # how the run starts, not what it trains
        "no_augment",                      # hidden former spelling of --augment none
        "quiet", "json_events"})),         # what the terminal shows
    "predict": Job(PredictConfig, cli_only=frozenset({"quiet", "json_output"}),
                   field_only=frozenset({"whole_image"})),   # --image-size whole
    "split": Job(SplitConfig, cli_only=frozenset({"json_output"})),
    "saliency": Job(SaliencyConfig, cli_only=frozenset({
        "slides", "csv", "checkpoint",          # the jobs' arguments: what is mapped,
        "out", "overview", "no_overview", "geojson",   # and the files written
        "target",                               # a regression's name for the index
        "view", "json_output"}),                # what the terminal shows
        renamed={"class_index": "index"}),
    "heatmap": Job(HeatmapConfig, cli_only=frozenset({
        "slide", "checkpoint", "out", "geojson",   # compute_heatmap's arguments
        "json_output"}),
        renamed={"class_index": "index"}),
    "verify": Job(VerifyConfig, cli_only=frozenset({"size", "json_output"}),  # size: hidden
                  parsed={"image_size": lambda text: _parse_size(text, "--image-size")}),
    "estimate-memory": Job(EstimateConfig, cli_only=frozenset({
        "size", "dtype", "budget",     # hidden former names of three options
        "json_output", "plot"}),       # what is printed, and a picture of it
        field_only=frozenset({"num_classes"})),   # the head's width: memory hardly moves
    "tissue": Job(TissueConfig, cli_only=frozenset({"slide", "json_output"})),
    "info": Job(InfoConfig, cli_only=frozenset({"slides", "json_output"})),
    "view": Job(ViewConfig, cli_only=frozenset({"slide"})),
    "report": Job(ReportConfig, cli_only=frozenset({"json_output"})),
    "make-sample-data": Job(SampleDataConfig, cli_only=frozenset({
        "tile",             # hidden former name of --tiff-tile-size
        "json_output"})),
}


def click_command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]


def cli_parameters(name: str) -> dict[str, click.Parameter]:
    return {param.name: param for param in click_command(name).params}


def plain(value: object) -> object:
    """A default as the job sees it: paths as strings, and "not given" as one value."""
    if isinstance(value, Path):
        return str(value)
    if value in ((), [], ""):
        return None
    return value


def shown_default(param: click.Parameter) -> str | None:
    """What --help shows in place of the default: a text, "hidden", or None (the value)."""
    if isinstance(param.show_default, str):
        return param.show_default
    return "hidden" if param.show_default is False else None


@pytest.mark.parametrize("command", sorted(JOBS))
def test_every_option_is_its_field(command):
    job = JOBS[command]
    drifts = []
    for name, param in cli_parameters(command).items():
        if name in job.cli_only:
            continue
        declared = option_field(job.config, job.renamed.get(name, name))
        shown = declared.metadata.get("shown")
        default = job.parsed.get(name, lambda value: value)(param.default)
        cli = (plain(default), param.help, shown_default(param))
        config = (plain(option_default(declared)), declared.metadata.get("help"), shown)
        if cli != config:
            drifts.append(f"--{name.replace('_', '-')}: CLI {cli} != config {config}")
    assert not drifts, "\n".join(drifts)


@pytest.mark.parametrize("command", sorted(JOBS))
def test_every_field_has_an_option(command):
    job = JOBS[command]
    options = {job.renamed.get(name, name) for name in cli_parameters(command)}
    for declared in fields(job.config):
        if declared.name in job.field_only:
            assert "help" not in declared.metadata, f"{declared.name}: not an option"
            continue
        assert declared.name in options, f"{command}: no option for {declared.name}"
        assert declared.metadata.get("help"), f"{command}: {declared.name} has no help"


def test_exceptions_are_real():
    """A listed exception that no longer exists would hide a new drift."""
    for command, job in JOBS.items():
        names = set(cli_parameters(command))
        assert job.cli_only <= names, command
        assert job.field_only <= {f.name for f in fields(job.config)}, command
        assert not (job.cli_only & {f.name for f in fields(job.config)}), command


def test_the_dist_timeout_is_the_library_default():
    from sstream.distributed import DEFAULT_TIMEOUT_S

    assert cli_parameters("train")["dist_timeout"].default == DEFAULT_TIMEOUT_S


def test_train_groups_its_options_in_panels():
    panels = {getattr(param, "rich_help_panel", None) for param in click_command("train").params
              if not getattr(param, "hidden", False)}
    assert None not in panels and len(panels) >= 5, panels


@pytest.mark.parametrize("config", [TrainConfig(train_csv="a.csv", image_size=(300, 200)),
                                    PredictConfig("best.pt", ["a.tif"], image_size=(8, 9)),
                                    SplitConfig("cohort.csv", "splits", folds=3),
                                    SaliencyConfig(index="tumour", mpp=0.5, uint8=True),
                                    HeatmapConfig(index=1, tissue="none"),
                                    VerifyConfig("tiny", (96, 80), 32, mpp=0.5),
                                    EstimateConfig(["8192x6144"], tile_size=["512"]),
                                    TissueConfig(out="p.png", mask="m.png", max_side=512),
                                    InfoConfig(mpp=0.5, thumbnail="t.png", max_side=256),
                                    ViewConfig(["map.tif"], port=0, tissue="auto"),
                                    SampleDataConfig("data", count=4, min_size=64, patients=2),
                                    ReportConfig(["fold_0", "fold_1"])])
def test_configs_round_trip_through_json(config):
    again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown config keys: colour, depth"):
        SplitConfig.from_dict({"csv": "a", "out": "b", "depth": 3, "colour": 1})


def test_option_declares_default_help_and_shown_default():
    @dataclass
    class Example(Options):
        size: tuple[int, int] | None = option(None, "Size.", shown="the whole image")
        names: list[str] = option(help="Names.", factory=list)

    size, names = fields(Example)
    assert (size.default, size.metadata) == (None, {"help": "Size.", "shown": "the whole image"})
    assert names.default is MISSING and option_default(names) == []
    assert Example.from_dict({"size": [3, 4]}).size == (3, 4)
    with pytest.raises(KeyError, match="no option 'colour'"):
        option_field(Example, "colour")


def test_estimate_reads_amp_dtypes_as_train_spells_them():
    dtypes = {None: "float32", "bf16": "bfloat16", "fp16": "float16", "float16": "float16"}
    for amp_dtype, dtype in dtypes.items():
        assert EstimateConfig(["512"], amp_dtype=amp_dtype).dtype == dtype


def test_saliency_options_by_name_replace_the_configs():
    from sstream.saliency import _saliency_config, compute_saliency

    config = SaliencyConfig(tile_size=128, method="gradient-x-input")
    assert _saliency_config(config, {"tile_size": 64}) == SaliencyConfig(
        tile_size=64, method="gradient-x-input")
    assert _saliency_config(None, {}) == SaliencyConfig()
    with pytest.raises(TypeError, match="colour"):  # as a function's unknown keyword
        compute_saliency("slide.tif", "best.pt", "map.tif", colour="red")


def test_given_takes_a_config_its_options_by_name_or_both():
    assert SampleDataConfig.given(None, {"out": "d", "count": 4}) == SampleDataConfig("d", 4)
    assert ViewConfig.given(ViewConfig(port=0), {"tissue": "auto"}) == ViewConfig(
        port=0, tissue="auto")
    assert ViewConfig.given(None, {}) == ViewConfig()
    with pytest.raises(TypeError, match="colour"):
        TissueConfig.given(TissueConfig(), {"colour": "red"})


def test_the_small_jobs_take_their_options_by_name(tmp_path):
    """make-sample-data, info, tissue and view from Python: a config's options by keyword."""
    from sstream.info import describe_slide, write_slide_thumbnail
    from sstream.sample_data import write_sample_data
    from sstream.tissue import preview_tissue
    from sstream.view import make_server

    written = write_sample_data(out=str(tmp_path / "d"), count=2, size=64, tiff_tile_size=32)
    assert (written.slides, written.cohort_csv) == (2, None) and written.val_csv.is_file()
    slide = tmp_path / "d" / "images" / "slide_000.tif"
    assert describe_slide(slide, mpp=1.0).read_size == (32, 32)  # the slide is at 0.5 µm/px
    thumbnail = write_slide_thumbnail(slide, InfoConfig(thumbnail=str(tmp_path / "t.png"),
                                                        max_side=16))
    assert (thumbnail.width, thumbnail.height) == (16, 16) and thumbnail.path.is_file()
    preview = preview_tissue(slide, max_side=32)
    assert preview.preview == tmp_path / "d" / "images" / "slide_000.tif.tissue.png"
    server = make_server(slide, port=0)
    try:
        assert server.source.tissue is None and len(server.source.layers) == 1
    finally:
        server.server_close()
        server.source.close()


@pytest.mark.parametrize(("config", "error"), [
    (PredictConfig("best.pt", tile_size=0), "--tile-size must be positive"),
    (PredictConfig("best.pt", level=1, mpp=0.5), "not both"),
    (SaliencyConfig(method="smoothgrad"), "unknown method 'smoothgrad'"),
    (SaliencyConfig(percentile=0), "percentile must be in"),
    (SaliencyConfig(contour_percentile=100), "contour percentile"),
    (HeatmapConfig(contour_percentile=0), "contour percentile"),
    (VerifyConfig(dtype="float16"), "--dtype must be one of"),
    (VerifyConfig(tile_size=0), "must be positive"),
    (SplitConfig("a.csv", "out", folds=1), "--folds"),
    (TrainConfig(train_csv="a.csv", epochs=0), "--epochs"),
    (TissueConfig(max_side=5), "--max-side must be at least 16"),
    (TissueConfig(tissue="none"), "--tissue none has no mask to preview"),
    (InfoConfig(mpp=float("nan")), "--mpp must be a positive number"),
    (InfoConfig(max_side=5), "--max-side must be at least 16"),
    (InfoConfig(assume_mpp=0.0), "--assume-mpp must be a positive"),
    (ViewConfig(port=70000), "--port must be in 0..65535"),
    (SampleDataConfig("d", count=1), "--count >= 2"),
    (SampleDataConfig("d", min_size=800), "--min-size <= --size"),
    (SampleDataConfig("d", val_fraction=1.0), "--val-fraction"),
    (SampleDataConfig("d", count=4, patients=5), "--patients must be in 2..--count"),
    (ReportConfig(), "give at least one run directory"),
])
def test_configs_refuse_what_cannot_work(config, error):
    with pytest.raises(ValueError, match=error):
        config.validate()


def test_defaults_are_valid():
    for config in (PredictConfig("best.pt"), SaliencyConfig(), HeatmapConfig(), VerifyConfig(),
                   SplitConfig("a.csv", "out"), TrainConfig(train_csv="a.csv"), TissueConfig(),
                   InfoConfig(), ViewConfig(), SampleDataConfig("d"), ReportConfig(["run"])):
        config.validate()
