"""Full-resolution saliency maps of whole slides, computed and written tile by tile.

The saliency of class k is the gradient of the class logit with respect to the model's input,
d logit_k / d x, where x (1, 3, H, W) is what `load_checkpoint`'s module takes: the pixels of
the slide level read, divided by 255 (Simonyan, Vedaldi & Zisserman, "Deep inside
convolutional networks", 2014). It is computed by the streaming backward pass
(`StreamingCNN`, Pinckaers et al., TPAMI 2020), so it equals plain autograd on the whole
image, and reduced over the colour channels per pixel:

    method             map(y, x)                               sign
    gradient           max_c |d logit_k / d x[c, y, x]|        >= 0  (Simonyan et al.)
    gradient-x-input   sum_c x[c, y, x] * d logit_k / d x[c, y, x]   signed (Shrikumar et al.
                                                                    2016; Ancona et al. 2018)

The algorithm box (`compute_saliency`), in the coordinates of the slide level read ("level
pixels", the stream's input pixels; `location`s handed to the slide reader are level-0):

1. forward: the engine streams the level through `model.stream` (tiles read lazily from the
   file). For heads that start with global max/avg pooling (every model whose whole trunk
   streams) the engine pools tile by tile (`StreamingCNN.global_pool`): no feature map is
   ever assembled; other heads get the feature map fmap (1, C', H', W'). The head gives the
   outputs (1, K): logits (the class explained is `index` or the argmax) or regression
   values (the target explained is `index` or the first), as the model's task says.
2. head backward: d logit_k / d fmap. After global pooling the engine forms it from the
   pooled (1, C') gradient, block by block (`global_pool`'s backward, engine/pooling.py):
   zero except at the C' argmax positions for max pooling (so only the tiles holding a
   maximum are re-run: the others add nothing), a broadcast value for averaging. Other
   heads use autograd.
3. stream backward: the engine re-runs the tiles and hands out d logit_k / d x in final
   blocks (1, 3, h, w) in raster order; each block is reduced over channels into a row of the
   map (h x W float32), which goes to a tiled pyramidal TIFF (`TiffMapWriter`) as soon as the
   row of blocks is complete. Meanwhile a histogram of |map| and a block-max overview of |map|
   are accumulated.

Memory: the input, its gradient and the map are never held whole; the largest buffers are one
tile's activations (the backward re-run), the engine's pending gradient sums (the crops'
overlap x W x 3 floats, plus a tile), one row of map blocks (tile x W floats) and the
writer's two rows of TIFF tiles. See `benchmarks/bench_saliency.py`.

Outputs:

- the map: same size as the level read, resolution (mpp) of that level, float32 by default.
  With `uint8=True` it is quantised with `scale` = the `percentile` (default 99.5) of |map|
  over its non-zero pixels (zeros lie outside every contributing receptive field and would
  otherwise dominate), read from a histogram with 32 log-spaced bins per octave (2 %
  resolution) and capped at the maximum: gradient maps as q = round(255 * min(v / scale, 1));
  signed maps as q = clip(128 + round(127 * v / scale), 1, 255). The level-0
  ImageDescription is a JSON record (method, class, probabilities, and for uint8 `scale`,
  `offset`, `step`: value ~ (q - offset) * step). Quantising needs the scale before the
  first value is written, so the float32 map is spooled to a raw temporary file next to the
  output (4 bytes a pixel on disk, no RAM) and quantised from it in a second pass.
- the overview PNG: the slide (read at the pyramid level nearest the overview's scale, then
  box-filtered) at ~2000 px on its longer side, overlaid with the map's block maximum of
  |value| coloured by the perceptual `inferno` colormap, opacity rising with the value, and
  a colour bar from 0 to `scale`.

Every file is written to a temporary sibling and renamed at the end: a failure leaves no
output (and no temporary file) behind.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sstream.data import PixelSource, Sample, named_samples
from sstream.distributed import DataParallel
from sstream.engine import StreamingCNN
from sstream.errors import InputError
from sstream.io import TiffMapWriter, atomic_output, read_downsampled
from sstream.io.colormap import inferno
from sstream.io.geojson import DEFAULT_PERCENTILE, map_features, write_geojson
from sstream.models import Classifier, load_checkpoint, minimum_input_size, streamed_logits
from sstream.options import AS_TRAINED, ASSUME_MPP_HELP, DEVICE_HELP, Options, option
from sstream.reading import ReadSpec
from sstream.runtime import resolve_device
from sstream.stain import slide_normaliser
from sstream.task import task_for_model
from sstream.tissue import Tissue, output_mask, pixel_mask

__all__ = [
    "METHODS",
    "SaliencyEvents",
    "SaliencyOptionError",
    "SaliencyProgress",
    "SaliencyResult",
    "SlidesSaliency",
    "SaliencyConfig",
    "compute_saliency",
    "default_output_paths",
    "saliency_for_slides",
    "inferno",
    "quantise",
    "render_overview",
]

METHODS = ("gradient", "gradient-x-input")
SIGNED_METHODS = ("gradient-x-input",)
OVERVIEW_SIDE = 2000  # px: the overview's longer side is at most this
MAP_TILE = 256  # TIFF tile edge of the written map (what viewers expect)
CHUNK_ELEMENTS = 1 << 20  # floats per temporary when reducing a gradient band (4 MB)

SaliencyProgress = Callable[[str, int, int], None]
"""Called as (phase, done, total): phases "forward" and "backward" count tiles, "quantise"
(uint8 only) counts rows of the map."""


class SaliencyOptionError(InputError):
    """An option value that cannot work (class out of range, unknown method...)."""


@dataclass
class SaliencyConfig(Options):
    """How `sstream saliency` maps a slide, the same for every slide: the options' defaults
    and help. The slides and the files written are the jobs' arguments."""

    index: int | str | None = option(  # a regression model's target index, too (--target)
        None, "Class whose logit is explained: its name (string labels) or index.",
        shown="the predicted class")
    level: int | None = option(None, "Slide pyramid level to read (the model's input).",
                               shown=AS_TRAINED)
    mpp: float | None = option(None, "Read at exactly this many µm per pixel (the map then "
                               "has this resolution).", shown=AS_TRAINED)
    assume_mpp: float | None = option(None, ASSUME_MPP_HELP)
    method: str = option("gradient", "gradient: max over colour channels of |d logit / d "
                         "pixel| (Simonyan et al.); gradient-x-input: sum over channels of "
                         "pixel x gradient (signed).")
    uint8: bool = option(False, "Write uint8 quantised with a percentile scale (recorded in "
                         "the TIFF description) instead of float32.")
    percentile: float = option(99.5, "Percentile of the non-zero |values| that sets the uint8 "
                               "scale and the overview's colour range.")
    tile_size: int = option(256, "Streaming tile side in pixels. Memory grows with it: "
                            "larger tiles take more memory and less time (docs/results.md).")
    device: str = option("auto", DEVICE_HELP)
    tissue: str | None = option(None, "auto, none or a mask image: the prediction pools over "
                                "tissue and the map is zero on glass.", shown=AS_TRAINED)
    contour_percentile: float = option(DEFAULT_PERCENTILE, "--geojson: outline the regions at "
                                       "or above this percentile of the map's non-zero "
                                       "|values|.")
    overwrite: bool = option(False, "Replace existing outputs.")

    def validate(self) -> None:
        """SaliencyOptionError for a value no slide can use."""
        if self.method not in METHODS:
            raise SaliencyOptionError(f"unknown method {self.method!r}; choose one of "
                                      f"{', '.join(METHODS)}")
        if not 0 < self.percentile <= 100:
            raise SaliencyOptionError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0 < self.contour_percentile < 100:
            raise SaliencyOptionError(f"the contour percentile must be in (0, 100), got "
                                      f"{self.contour_percentile}")


def _saliency_config(config: SaliencyConfig | None, options: dict[str, Any]) -> SaliencyConfig:
    """`config` (default: SaliencyConfig()) with the options given by name in its place
    (TypeError for a name that is no option, as for a function's keyword)."""
    return replace(config or SaliencyConfig(), **options)


@dataclass
class SaliencyResult:
    """What `compute_saliency` wrote and found.

    Attributes:
        out: the map's TIFF. overview: the PNG, or None.
        index: the output differentiated (a class, or a regression target).
        prediction: the task's record of the model's outputs for the slide (classification:
            class, predicted_class, probabilities, logits; regression: target,
            target_name, predictions), as written into the map's description; summary:
            it in one line.
        method, level: as used; size: (width, height) of the map = of the level read.
        mpp: microns per pixel of the map (None if the slide does not say).
        encoding: "float32" or "uint8".
        min, max: extremes of the map's values.
        scale: the `percentile` of |value| over the non-zero pixels (0 for an all-zero map):
            the uint8 quantisation's full scale and the top of the overview's colour bar.
        nonzero: number of non-zero pixels. tiles: tiles of the engine's plan.
        seconds: wall time.
    """

    out: Path
    overview: Path | None
    index: int
    prediction: dict
    summary: str
    method: str
    level: int
    size: tuple[int, int]
    mpp: float | None
    encoding: str
    min: float
    max: float
    scale: float
    percentile: float
    nonzero: int
    tiles: int
    seconds: float
    resize: float = 1.0          # the level resized by this to read at `mpp` (1: as it is)
    notes: list[str] = field(default_factory=list)  # where reading departs from training


def default_output_paths(slide_path: str | os.PathLike,
                         out: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The map and overview paths by default: `<slide>.saliency.tif` next to the slide (or
    `out`), and the map's path with the suffix `.png`."""
    slide_path = Path(slide_path)
    if out is None:
        out = slide_path.with_name(f"{_slide_stem(slide_path)}.saliency.tif")
    out = Path(out)
    overview = out.with_suffix(".png") if out.suffix.lower() in (".tif", ".tiff") \
        else out.with_name(out.name + ".png")
    return out, overview


def _slide_stem(slide_path: Path) -> str:
    """A slide's name without its suffixes (`a.ome.tif` -> `a`), which its outputs take."""
    return slide_path.name.split(".")[0] or slide_path.name


def compute_saliency(
    slide_path: str | os.PathLike | Sample,
    checkpoint: str | os.PathLike | Classifier,
    out: str | os.PathLike,
    overview: str | os.PathLike | None = None,
    config: SaliencyConfig | None = None,
    progress: SaliencyProgress | None = None,
    geojson: str | os.PathLike | None = None,
    **options: Any,
) -> SaliencyResult:
    """Write the saliency map of a slide (pyramidal TIFF) and optionally a PNG overview.

    Args:
        slide_path: the slide or image (anything `sstream.io.open_image` reads), or a
            CSV row (`sstream.data.Sample`: its mask and mpp columns are used).
        checkpoint: an sstream checkpoint file (`load_checkpoint`), or a Classifier (moved
            to `device` and put in eval mode).
        out: the map's TIFF path. overview: the PNG path, or None for no overview.
        config: how the slide is mapped (`SaliencyConfig`; default: its defaults), and
            options: any of its fields by name, in place of the config's. The fields:
        index: the class whose logit is explained (None: the predicted class), or for a
            regression model the target whose value is explained (None: the first).
        level, mpp: the slide level to read as it is, or exactly `mpp` µm per pixel
            (`sstream.reading.ReadSpec`); None: as the model was trained (its checkpoint's
            record; level 0 for older checkpoints). The whole image is read, whatever crop
            training used. assume_mpp: level 0's µm per pixel if the slide states none.
        method: "gradient" (max over channels of |gradient|) or "gradient-x-input" (sum over
            channels of pixel x gradient); see the module docstring.
        uint8: write a uint8 map quantised with the percentile scale instead of float32.
        percentile: the percentile of non-zero |values| that defines `scale`, in (0, 100].
        tile_size: the engine's tile side in input pixels (memory grows with it and with the
            level's width: one row of map blocks is tile x width floats).
        device: where the model runs: "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
            or a torch.device.
        overwrite: replace existing output files.
        tissue: "auto", "none" or a mask file (`sstream.tissue`); None: as the model was
            trained (its checkpoint's record). The prediction pools over tissue only, and
            the map is zero on glass.
        progress: called as (phase, done, total); see `SaliencyProgress`.
        geojson: also write the regions where the overview's block maximum of |map| is at
            or above the config's `contour_percentile` of the non-zero |values| as QuPath
            annotations (`sstream.io.geojson`; polygons in level-0 pixels, traced at the
            overview's resolution).

    Returns:
        a SaliencyResult.

    Raises:
        SaliencyOptionError (a ValueError): class index out of range, unknown method, both
            `level` and `mpp`, a percentile outside (0, 100].
        FileExistsError: an output exists and not `overwrite` (checked before computing).
        FileNotFoundError, IsADirectoryError, PermissionError: missing checkpoint, missing or
            unwritable output directory.
        sstream.io.ImageReadError (a ValueError): the slide cannot be read.
        ValueError: a checkpoint that does not load, an image smaller than the model accepts.
    """
    started = time.perf_counter()
    config = _saliency_config(config, options)
    config.validate()
    method, percentile, overwrite, uint8 = (config.method, config.percentile,
                                            config.overwrite, config.uint8)
    out = Path(out)
    overview = None if overview is None else Path(overview)
    if overview is not None and overview.resolve() == out.resolve():
        raise SaliencyOptionError(f"{out}: the map and the overview need different paths")
    for path in (out, overview, None if geojson is None else Path(geojson)):
        if path is not None:
            _refuse_unwritable(path, overwrite)

    device = (config.device if isinstance(config.device, torch.device)
              else resolve_device(config.device))
    model = (checkpoint.to(device) if isinstance(checkpoint, Classifier)
             else load_checkpoint(checkpoint, map_location=device)).eval()
    task = task_for_model(model)
    index = config.index
    if index is not None:
        try:
            index = task.output_index(index)  # a class's name or index
            task.output_name(index)
        except ValueError as exc:
            raise SaliencyOptionError(str(exc)) from None
    wanted_grad = [(param, param.requires_grad) for param in model.parameters()]
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        for param, _ in wanted_grad:
            param.requires_grad_(False)  # only the input gradient is wanted
        stack.callback(lambda: [param.requires_grad_(flag) for param, flag in wanted_grad])
        trained = replace(ReadSpec.for_model(model.config), image_size=None)
        spec = trained.overridden(config.level, config.mpp, None, config.tissue,
                                  config.assume_mpp)
        Tissue.parse(spec.tissue)  # a bad choice fails before the slide is read
        read = stack.enter_context(spec.open(slide_path))
        slide, source, resolution = read.slide, read.source, read.resolution
        source.stain = slide_normaliser(model.config.stain_normalize, read)  # as trained
        level, height, width = resolution.level, source.height, source.width
        smallest = minimum_input_size(model)
        if min(height, width) < smallest:
            raise InputError(f"{slide.path}: the image read ({spec.resolution_text}) is "
                             f"{width} x {height} pixels, smaller than the {smallest} x "
                             f"{smallest} the model accepts")
        stream = StreamingCNN(model.stream, config.tile_size)
        tiles = len(stream.plan(source.shape))
        mask = output_mask(source, stream)
        if progress is not None:
            stream.on_tile = progress

        # Outputs are opened before the long computation (so that a bad path fails fast),
        # except the map's TIFF, whose description needs the class: a probe checked it.
        overview_tmp = None if overview is None else stack.enter_context(
            atomic_output(overview, overwrite=overwrite))
        spool = stack.enter_context(_RawSpool(out)) if uint8 else None
        bands = _MapBands(source, method, height, width,
                          overview_factor=max(1, -(-max(height, width) // OVERVIEW_SIDE)),
                          spool=spool)

        # 1. forward: tiles -> (pooled) features -> outputs (1, K)
        outputs = streamed_logits(model, stream, source, mask, input_grad_sink=bands)
        chosen, prediction = task.explained(outputs[0], index)

        level_mpp = resolution.mpp
        record = {"sstream": "saliency", "slide": slide.path.name, "level": level,
                  "mpp": level_mpp, "resize": resolution.resize, "method": method,
                  **prediction}
        if not uint8:
            bands.writer = stack.enter_context(TiffMapWriter(
                out, (height, width), np.float32, tile_size=MAP_TILE, mpp=level_mpp,
                description=json.dumps({**record, "encoding": "float32"}),
                overwrite=overwrite))

        # 2. head backward -> d output / d fmap; 3. stream backward -> bands -> map
        outputs[0, chosen].backward()
        del outputs
        bands.finish()
        scale = bands.histogram.percentile(percentile)

        if uint8:
            signed = method in SIGNED_METHODS
            offset, step = (128, scale / 127) if signed else (0, scale / 255)
            description = {**record, "encoding": "uint8", "scale": scale,
                           "percentile": percentile, "offset": offset, "step": step,
                           "decode": "value = (q - offset) * step"}
            writer = stack.enter_context(TiffMapWriter(
                out, (height, width), np.uint8, tile_size=MAP_TILE, mpp=level_mpp,
                description=json.dumps(description), overwrite=overwrite))
            assert spool is not None
            _quantise(spool, writer, height, width, scale, signed, progress)

        if geojson is not None:
            factor = bands.overview.factor  # level pixels per overview pixel
            write_geojson(geojson, map_features(
                bands.overview.image, bands.histogram.percentile(config.contour_percentile),
                lambda y, x: source.level0(y * factor, x * factor),
                task.output_name(chosen)))

        if overview_tmp is not None:
            background = read_downsampled(slide, level, bands.overview.shape)
            image = render_overview(background, bands.overview.image, scale,
                                    _colour_bar_title(method, task.output_name(chosen)))
            image.save(overview_tmp, format="PNG")

    return SaliencyResult(
        out=out, overview=overview, index=chosen, prediction=prediction,
        summary=task.summary(prediction), method=method,
        level=level,
        size=(width, height), mpp=level_mpp, encoding="uint8" if uint8 else "float32",
        min=bands.min, max=bands.max, scale=scale, percentile=percentile,
        nonzero=bands.histogram.count, tiles=tiles,
        seconds=time.perf_counter() - started, resize=resolution.resize,
        notes=spec.notes(trained))


def _refuse_unwritable(path: Path, overwrite: bool) -> None:
    """Fail now, not after an hour of computing, for an output that cannot be written."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not an output file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise PermissionError(f"{path}: cannot write in {parent} ({exc.strerror})") from None


# --------------------------------------------------------------------------------------------
# Several slides: one map per slide, the slides shared among torchrun's ranks


class SaliencyEvents:
    """Hooks for the progress of `saliency_for_slides`; no-ops here (the CLI renders them)."""

    def on_start(self, slides: int) -> None: ...
    def on_slide_start(self, name: str, position: int) -> None: ...
    def on_tile(self, phase: str, done: int, total: int) -> None: ...
    def on_slide_end(self, name: str, position: int, result: SaliencyResult | None,
                     error: str | None) -> None: ...


@dataclass
class SlidesSaliency:
    """What `saliency_for_slides` wrote, in input order.

    Attributes:
        maps: each slide mapped, by name (as given, or as its CSV writes it), in input
            order. failures: each slide skipped, by name: the reason, in one line. Under
            torchrun every rank holds every rank's outcomes.
        slides: how many slides were given. rank: this process's rank (0 alone reports).
    """

    maps: dict[str, SaliencyResult]
    failures: dict[str, str]
    slides: int
    rank: int = 0


def saliency_for_slides(
    checkpoint: str | os.PathLike | Classifier,
    slides: list[str] | tuple[str, ...] = (),
    csv: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    overviews: bool = True,
    config: SaliencyConfig | None = None,
    events: SaliencyEvents | None = None,
    **options: Any,
) -> SlidesSaliency:
    """Write the saliency map of each of several slides, as `compute_saliency` does for one.

    Under torchrun (WORLD_SIZE and RANK set) each rank maps every world_size-th slide and
    writes its maps (one file per slide: nothing to merge); the outcomes are gathered, so
    rank 0 can report them all. One slide that cannot be read (or is too small) is reported
    and skipped; the others are still mapped.

    Args:
        checkpoint: as for `compute_saliency` (loaded once for every slide).
        slides, csv: the slides' paths, or a CSV with an image column (labels optional; its
            mask and mpp columns are used, as predict does; paths relative to its folder).
        out_dir: the folder of the maps, `<slide stem>.tif` and `<slide stem>.png` (made if
            missing); None: each beside its slide, as `default_output_paths` says.
        overviews: also write each slide's PNG overview.
        config, options: how every slide is mapped, as for `compute_saliency`; the device
            "auto" or "cuda" under torchrun means the rank's own GPU (cuda:LOCAL_RANK).
            `geojson` names one file and is refused.
        events: progress hooks; `SaliencyEvents`.

    Raises:
        SaliencyOptionError: an option no slide can use (an unknown method or class...).
        ValueError, DatasetError: no slides, both slides and a CSV, a bad CSV, one mask file
            (--tissue PATH) for several slides, two slides whose outputs share a path.
        FileExistsError: an output exists and not `overwrite` (before any slide is mapped).
        NotADirectoryError: `out_dir` is a file.
        RankFailure: under torchrun, another rank failed.
    """
    if options.pop("geojson", None) is not None:
        raise SaliencyOptionError("geojson names one file: map one slide to trace its regions")
    config = _saliency_config(config, options)
    config.validate()  # before the checkpoint loads and any slide is read
    events = events or SaliencyEvents()
    parallel, torch_device = DataParallel.from_env(config.device)
    try:
        model = (checkpoint if isinstance(checkpoint, Classifier)
                 else load_checkpoint(checkpoint, map_location=torch_device))
        inputs = named_samples(list(slides), None if csv is None else str(csv),
                               task_for_model(model))
        if Tissue.parse(config.tissue).is_file and len(inputs) > 1:
            raise InputError("--tissue PATH is the mask of one slide; give each slide its mask "
                             "in the CSV's mask column")
        paths = _slide_outputs([sample.image for _, sample in inputs], out_dir, overviews)
        mine = parallel.shard(0, len(inputs))
        with parallel.agreement("checking the outputs"):
            for position in mine:  # before an hour of computing, not after it
                _refuse_existing(paths[position], config.overwrite)
        events.on_start(len(inputs))
        with parallel.agreement("mapping the slides"):
            outcomes = [(position, *_map_slide(inputs[position], position, paths[position],
                                               model, events, replace(config,
                                                                      device=torch_device)))
                        for position in mine]
        if parallel.distributed:  # every rank's outcomes, back in input order
            outcomes = sorted((o for part in parallel.gather_objects(
                outcomes, "gathering the maps' outcomes") for o in part), key=lambda o: o[0])
    finally:
        parallel.close()
    return SlidesSaliency(
        maps={inputs[i][0]: result for i, result, _ in outcomes if result is not None},
        failures={inputs[i][0]: reason for i, result, reason in outcomes if result is None},
        slides=len(inputs), rank=parallel.rank)


def _slide_outputs(slides: list[Path], out_dir: str | os.PathLike | None, overviews: bool
                   ) -> list[tuple[Path, Path | None]]:
    """(map, overview or None) of each slide: `out_dir/<stem>.tif` and `.png`, or beside the
    slide by default. Two slides with one output path are refused; `out_dir` is made."""
    if out_dir is None:
        paths = [default_output_paths(slide) for slide in slides]
    else:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir}: is a file; --out names a folder when "
                                     "several slides are mapped")
        paths = [(out_dir / f"{_slide_stem(slide)}.tif", out_dir / f"{_slide_stem(slide)}.png")
                 for slide in slides]
    first: dict[Path, Path] = {}
    for slide, (map_path, _) in zip(slides, paths):
        other = first.setdefault(map_path.resolve(), slide)
        if other != slide:
            raise InputError(f"{other} and {slide} would both write {map_path}: rename one, "
                             "or map them into different folders")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    return [(map_path, overview if overviews else None) for map_path, overview in paths]


def _refuse_existing(paths: tuple[Path, Path | None], overwrite: bool) -> None:
    for path in paths:
        if path is not None and path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")


def _map_slide(named: tuple[str, Sample], position: int, paths: tuple[Path, Path | None],
               model: Classifier, events: SaliencyEvents, config: SaliencyConfig
               ) -> tuple[SaliencyResult | None, str | None]:
    """One slide's map: (result, None), or (None, the reason) for a slide that cannot be
    mapped. Options no slide can use (SaliencyOptionError) stop every slide."""
    name, sample = named
    events.on_slide_start(name, position)
    try:
        result = compute_saliency(sample, model, paths[0], overview=paths[1], config=config,
                                  progress=events.on_tile)
    except SaliencyOptionError:
        raise
    except (ValueError, OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        events.on_slide_end(name, position, None, reason)
        return None, reason
    events.on_slide_end(name, position, result, None)
    return result, None


# --------------------------------------------------------------------------------------------
# The gradient sink: bands -> channel reduction -> writer / spool, histogram, overview


class _MapBands:
    """The engine's input-gradient sink: reduces blocks over channels and passes rows on.

    Receives (box=(y0, y1, x0, x1), grad (1, 3, y1 - y0, x1 - x0)) in level pixels, in raster
    order; each row of blocks spans the full width and is passed on once complete.
    """

    def __init__(self, source: PixelSource, method: str, height: int, width: int,
                 overview_factor: int, spool: _RawSpool | None) -> None:
        self.source, self.method = source, method
        self.height, self.width = height, width
        self.writer: TiffMapWriter | None = None
        self.spool = spool
        self.histogram = _LogHistogram()
        self.overview = _BlockMaxOverview(height, width, overview_factor)
        self.rows_done = self.cols_done = 0
        self.row: np.ndarray | None = None  # the row of blocks being filled (h, W)
        self.min, self.max = math.inf, -math.inf

    def __call__(self, box: tuple[int, int, int, int], grad: torch.Tensor) -> None:
        y0, y1, x0, x1 = box
        if (y0, x0) != (self.rows_done, self.cols_done):
            raise RuntimeError(f"internal error: gradient block at ({y0}, {x0}), expected "
                               f"({self.rows_done}, {self.cols_done})")
        if self.row is None:
            self.row = np.empty((y1 - y0, self.width), np.float32)
        chunk = max(1, CHUNK_ELEMENTS // (grad.shape[1] * (x1 - x0)))
        for r0 in range(y0, y1, chunk):
            r1 = min(y1, r0 + chunk)
            g = grad[0, :, r0 - y0:r1 - y0]  # (3, h, w)
            if self.method == "gradient":
                values = g.abs().amax(0)  # (h, w)
            else:
                pixels = self.source.read((r0, r1, x0, x1))[0].to(g)  # (3, h, w)
                values = (pixels * g).sum(0)
            values = values.float().cpu().numpy()
            on_tissue = pixel_mask(self.source, (r0, r1, x0, x1))
            self.row[r0 - y0:r1 - y0, x0:x1] = values if on_tissue is None else \
                np.where(on_tissue, values, 0.0)  # zero on glass
        self.cols_done = x1
        if x1 == self.width:  # the row of blocks is complete: pass it on, in row chunks
            chunk = max(1, CHUNK_ELEMENTS // self.width)
            for r0 in range(0, self.row.shape[0], chunk):
                self._emit(y0 + r0, self.row[r0:r0 + chunk])
            self.row, self.cols_done = None, 0

    def _emit(self, y0: int, rows: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.write_band(y0, rows)
        if self.spool is not None:
            self.spool.write(rows)
        self.histogram.add(rows)
        self.overview.add(rows)
        self.min = min(self.min, float(rows.min()))
        self.max = max(self.max, float(rows.max()))
        self.rows_done = y0 + rows.shape[0]

    def finish(self) -> None:
        if self.rows_done != self.height:
            raise RuntimeError(f"internal error: the backward pass gave {self.rows_done} of "
                               f"{self.height} rows of the input gradient")
        self.overview.finish()


class _LogHistogram:
    """Counts of |value| for non-zero values in log-spaced bins (BINS_PER_OCTAVE an octave),
    covering float32's whole range; percentiles to within a bin (2.2 %)."""

    BINS_PER_OCTAVE = 32
    LOW_OCTAVE, HIGH_OCTAVE = -150, 129  # float32: 2^-149 (subnormal) .. 2^128

    def __init__(self) -> None:
        self.counts = np.zeros((self.HIGH_OCTAVE - self.LOW_OCTAVE) * self.BINS_PER_OCTAVE,
                               np.int64)
        self.largest = 0.0

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def add(self, values: np.ndarray) -> None:
        magnitudes = np.abs(values[values != 0])
        if not magnitudes.size:
            return
        self.largest = max(self.largest, float(magnitudes.max()))
        octaves = np.log2(magnitudes, dtype=np.float32)
        bins = ((octaves - self.LOW_OCTAVE) * self.BINS_PER_OCTAVE).astype(np.int32)
        bins = np.clip(bins, 0, self.counts.size - 1)
        self.counts += np.bincount(bins, minlength=self.counts.size)

    def percentile(self, q: float) -> float:
        """The q-th percentile of the non-zero |values| (a bin's upper edge, at most the
        largest value); 0.0 when all values were zero."""
        total = self.count
        if total == 0:
            return 0.0
        index = int(np.searchsorted(np.cumsum(self.counts), q / 100 * total))
        edge = 2.0 ** ((index + 1) / self.BINS_PER_OCTAVE + self.LOW_OCTAVE)
        return min(edge, self.largest)


class _BlockMaxOverview:
    """max |value| over factor x factor blocks of the map, from rows arriving top to bottom
    in bands of any height (rows short of a whole block are carried to the next band)."""

    def __init__(self, height: int, width: int, factor: int) -> None:
        self.factor = factor
        self.shape = (-(-height // factor), -(-width // factor))  # (h, w) overview pixels
        self.image = np.zeros(self.shape, np.float32)
        self.width = width
        self.carry = np.zeros((0, width), np.float32)
        self.rows_out = 0

    def add(self, rows: np.ndarray) -> None:
        rows = np.concatenate([self.carry, np.abs(rows)]) if self.carry.size else np.abs(rows)
        whole = rows.shape[0] - rows.shape[0] % self.factor
        self._reduce(rows[:whole])
        self.carry = rows[whole:].copy()

    def finish(self) -> None:
        if self.carry.shape[0]:
            self._reduce(self.carry)  # a last, partial block
            self.carry = np.zeros((0, self.width), np.float32)

    def _reduce(self, rows: np.ndarray) -> None:
        if not rows.shape[0]:
            return
        f = self.factor
        blocks = -(-rows.shape[0] // f)
        padded = np.zeros((blocks * f, self.shape[1] * f), np.float32)  # |value| >= 0
        padded[:rows.shape[0], :self.width] = rows
        reduced = padded.reshape(blocks, f, self.shape[1], f).max(axis=(1, 3))
        self.image[self.rows_out:self.rows_out + blocks] = reduced
        self.rows_out += blocks


class _RawSpool:
    """A raw float32 row-major temporary file next to `target`, deleted on exit."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> _RawSpool:
        fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".f32.tmp",
                                    dir=self.target.parent)
        self.path = Path(name)
        self.file = os.fdopen(fd, "w+b")
        return self

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, np.float32).tobytes())

    def read_rows(self, count: int, width: int) -> np.ndarray:
        rows = np.fromfile(self.file, np.float32, count=count * width)
        if rows.size != count * width:
            raise RuntimeError(f"{self.path}: spool is short")
        return rows.reshape(count, width)

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _quantise(spool: _RawSpool, writer: TiffMapWriter, height: int, width: int, scale: float,
              signed: bool, progress: SaliencyProgress | None) -> None:
    """Second pass of --uint8: spooled float32 rows -> uint8 rows, band by band."""
    spool.file.flush()
    spool.file.seek(0)
    chunk = max(1, CHUNK_ELEMENTS // width)
    for y0 in range(0, height, chunk):
        rows = spool.read_rows(min(chunk, height - y0), width)
        writer.write_band(y0, quantise(rows, scale, signed))
        if progress is not None:
            progress("quantise", y0 + rows.shape[0], height)


def quantise(values: np.ndarray, scale: float, signed: bool) -> np.ndarray:
    """float map values -> uint8 (see the module docstring; scale 0 maps to 0 or 128)."""
    if scale <= 0:
        return np.full(values.shape, 128 if signed else 0, np.uint8)
    if signed:
        return np.clip(np.rint(values * (127 / scale)) + 128, 1, 255).astype(np.uint8)
    return np.clip(np.rint(values * (255 / scale)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Overview: background, colormap, colour bar

def _colour_bar_title(method: str, output: str) -> str:
    what = "|gradient|" if method == "gradient" else "|gradient x input|"
    return f"{what}, {output}"


def render_overview(background: np.ndarray, saliency: np.ndarray, scale: float,
                    title: str = "") -> object:
    """The overview image (PIL): `background` (h, w, 3) uint8 with `saliency` (h, w) >= 0
    overlaid (inferno colours, opacity 0.75 * sqrt(value / scale)), and a colour bar."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = saliency.shape
    font_size = max(11, min(height, 2000) // 45)
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        font = ImageFont.load_default()
    margin = font_size
    bar_w = max(12, font_size)
    labels = [f"{scale * f:.3g}" for f in (1.0, 0.5, 0.0)]
    labels[0] = f">{labels[0]}" if scale > 0 else labels[0]  # the default font has no ≥
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(probe.textlength(text, font=font)) for text in labels)
    title_w = int(probe.textlength(title, font=font)) if title else 0
    panel_w = max(margin + bar_w + margin // 2 + label_w + margin, title_w + 2 * margin)
    canvas_h = max(height, 8 * font_size)
    canvas = Image.new("RGB", (width + panel_w, canvas_h), "white")
    lut = inferno(np.linspace(0.0, 1.0, 256)).astype(np.float32)  # (256, 3)
    for y0 in range(0, height, 128):  # in bands of rows: bounded float temporaries
        values = saliency[y0:y0 + 128].astype(np.float32)
        t = np.clip(values / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(values)
        alpha = (0.75 * np.sqrt(t))[..., None]
        colours = lut[np.rint(t * 255).astype(np.uint8)]
        mixed = background[y0:y0 + 128].astype(np.float32) * (1 - alpha) + colours * alpha
        canvas.paste(Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8)), (0, y0))

    draw = ImageDraw.Draw(canvas)
    top = margin + (2 * font_size if title else 0)
    bar_h = max(16, canvas_h - top - 2 * margin)
    ramp = inferno(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    x0 = width + margin
    canvas.paste(Image.fromarray(ramp), (x0, top))
    draw.rectangle([x0 - 1, top - 1, x0 + bar_w, top + bar_h], outline="black")
    if title:
        draw.text((width + margin, margin), title, fill="black", font=font)
    for text, position in zip(labels, (0.0, 0.5, 1.0)):
        y = top + position * (bar_h - 1)
        draw.line([x0 + bar_w, y, x0 + bar_w + margin // 3, y], fill="black")
        draw.text((x0 + bar_w + margin // 2, y), text, fill="black", font=font, anchor="lm")
    return canvas



class _CallableModule(types.ModuleType):
    """Makes `sstream.saliency(...)` call `compute_saliency` while `sstream.saliency` stays
    this module (a package attribute named like a submodule is always rebound to it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> SaliencyResult:
        return compute_saliency(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
