"""The `sstream estimate-memory` job: will training at this image size fit, and with which tile?

Builds the model (no weights needed: memory depends on shapes only) and asks the engine's
meta-device estimator (`sstream.engine.memory`) for conventional and streaming peaks per image
size and tile size. Inputs are the strings a user types; everything that cannot be parsed
raises ValueError with one line that says what was expected.

Units: `GB`, `MB`, `kB`, `TB` are powers of 1000 (12GB = 12e9 bytes), `GiB`, `MiB`, `KiB`,
`TiB` powers of 1024 (12GiB = 12 * 2**30 bytes, what `nvidia-smi` calls 12 GiB and PyTorch
reports); a bare number is bytes ("12e9"). Output tables use GiB/MiB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sstream.engine.memory import MemoryEstimate, MemoryRow, estimate_training_memory
from sstream.errors import InputError
from sstream.models import MODEL_NAMES, ModelConfig, build_model
from sstream.options import Options, option
from sstream.runtime import parse_bytes

__all__ = ["DEFAULT_TILE_SIZES", "EstimateConfig", "MemoryReport", "estimate_memory",
           "format_bytes", "parse_size", "parse_tile_size", "plot_estimate",
           "write_memory_plot"]

DEFAULT_TILE_SIZES = (512, 1024, 2048, 4096)
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # train's --amp-dtype spellings


@dataclass
class EstimateConfig(Options):
    """Options of `sstream estimate-memory`: their defaults and help. Sizes, tiles and the
    budget are the strings a user types (the job parses them)."""

    image_size: list[str] = option(
        help="Image size: 8192 (square) or 8192x6144 (width x height); repeat for several.",
        factory=list, shown="required")
    model: str = option("resnet34", "Model name (see sstream.models).")
    stream_layers: str | None = option(
        None, "Stream up to and including this stage (resnet: layer1..layer4; "
        "convnext_tiny/tiny: stage1..stage4; vgg16: block1..block5).", shown="the whole trunk")
    tile_size: list[str | int] = option(
        help="Streaming tile side in pixels; repeat for several.", factory=list,
        shown="512 1024 2048 4096 (those not larger than the image)")
    amp_dtype: str | None = option(  # also float32, float16 or bfloat16 (the former --dtype)
        None, "Mixed precision in bf16 or fp16 (as train --amp --amp-dtype): float32 "
        "parameters, gradients and optimizer state.", shown="float32 throughout")
    optimizer: str = option("adamw", "adamw or sgd (momentum).")
    memory_budget: str | None = option(
        None, "Memory budget, e.g. 12GiB (2**30 bytes each), 12GB (10**9), 500MiB, 12e9: "
        "prints the largest tile that fits.")
    engine: str = option("auto", "Streaming engine to model: auto (halo where the stream "
                         "allows it, as training picks), halo or crop.")
    pooling: str = option("max", "The head's pooling, as for train: max, avg or attention.")
    num_classes: int = 2  # not an option: the head's outputs hardly weigh on memory

    @property
    def dtype(self) -> str:
        """The activations' dtype: float32, or bfloat16 or float16 under mixed precision."""
        return AMP_DTYPES.get(self.amp_dtype or "", self.amp_dtype or "float32")
@dataclass
class MemoryReport:
    """What `estimate_memory` found: a row per image size and mode (conventional, then each
    tile), and with a budget one piece of advice per size. `to_dict` gives all but the
    engine's estimates (not JSON), which `sstream estimate-memory --json` prints."""

    model: str
    stream_layers: str | None
    engine: str
    dtype: str
    optimizer: str
    budget_bytes: int | None
    # per row: image_width, image_height, mode, tile_size (None for conventional),
    # peak_bytes, parameters_bytes, ..., saving, num_tiles, compute_overhead
    rows: list[dict[str, Any]] = field(default_factory=list)
    # per size, with a budget: tile_size (the largest that fits, or None), fits, message
    advice: list[dict[str, Any]] = field(default_factory=list)
    estimates: list[MemoryEstimate] = field(default_factory=list)  # per size, the engine's

    @property
    def over_budget(self) -> bool:
        """A budget was given and nothing fits it at any size."""
        return bool(self.advice) and not any(a["fits"] for a in self.advice)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "stream_layers": self.stream_layers,
                "engine": self.engine, "dtype": self.dtype, "optimizer": self.optimizer,
                "budget_bytes": self.budget_bytes, "rows": self.rows, "advice": self.advice}


def parse_size(text: str) -> tuple[int, int]:
    """'8192' (square) or '8192x6144' (width x height) -> (height, width); ValueError else."""
    match = re.fullmatch(r"\s*([0-9]+)\s*(?:[xX]\s*([0-9]+))?\s*", text)
    if not match or int(match.group(1)) <= 0 or (match.group(2) and int(match.group(2)) <= 0):
        raise InputError(f"image size must be a positive integer or WIDTHxHEIGHT (e.g. 8192 or "
                         f"8192x6144), got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    return height, width


def parse_tile_size(text: str | int) -> int:
    """'1024' -> 1024 (a tile side in input pixels); ValueError for anything else."""
    if isinstance(text, int) or re.fullmatch(r"\s*[0-9]+\s*", str(text)):
        value = int(text)
        if value > 0:
            return value
    raise InputError(f"tile size must be a positive integer (pixels), got {text!r}")


def format_bytes(n: float) -> str:
    """Bytes in binary units: '7.29 GiB', '512 MiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 1000 else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def _tile_json(row: MemoryRow) -> int | list[int] | None:
    if row.tile_size is None:
        return None
    height, width = row.tile_size
    return height if height == width else [height, width]


def _row_dict(estimate: MemoryEstimate, row: MemoryRow) -> dict[str, Any]:
    height, width = estimate.image_size
    return {
        "image_width": width, "image_height": height, "mode": row.mode,
        "tile_size": _tile_json(row), "peak_bytes": row.peak_bytes,
        "parameters_bytes": row.parameters_bytes, "gradients_bytes": row.gradients_bytes,
        "optimizer_bytes": row.optimizer_bytes, "activations_bytes": row.activations_bytes,
        "feature_map_bytes": row.feature_map_bytes, "tile_peak_bytes": row.tile_peak_bytes,
        "saving": row.saving, "num_tiles": row.num_tiles, "engine": row.engine,
        "path": row.path,
        "largest_crop": list(row.largest_crop) if row.largest_crop else None,
        "compute_overhead": row.compute_overhead,
    }


def _advice(estimate: MemoryEstimate, budget: int, stream_layers: str | None,
            model_name: str) -> dict[str, Any]:
    """The largest streaming tile that fits the budget, or why none does."""
    height, width = estimate.image_size
    conventional = estimate.conventional
    streaming = [r for r in estimate.rows if r.mode == "streaming"]
    fitting = [r for r in streaming if r.peak_bytes <= budget]
    size = f"{width}x{height}"
    if fitting:
        best = max(fitting, key=lambda r: r.tile_size[0] * r.tile_size[1])
        note = (" (conventional training fits too)" if conventional.peak_bytes <= budget
                else "")
        return {"image_width": width, "image_height": height, "tile_size": _tile_json(best),
                "fits": True, "message": (
                    f"{size}: tile {best.tile_size[1]} fits the budget "
                    f"{format_bytes(budget)} (predicted peak {format_bytes(best.peak_bytes)}, "
                    f"{best.num_tiles} tiles, ~{best.compute_overhead:.2g}x compute){note}")}
    if conventional.peak_bytes <= budget:
        message = (f"{size}: conventional training fits the budget {format_bytes(budget)} "
                   f"(predicted peak {format_bytes(conventional.peak_bytes)}); "
                   "no streaming tile given fits")
        return {"image_width": width, "image_height": height, "tile_size": None, "fits": True,
                "message": message}
    fixed = (conventional.parameters_bytes + conventional.optimizer_bytes
             + (streaming[0].feature_map_bytes if streaming else 0))
    if streaming and fixed > budget:
        message = (f"{size}: nothing fits {format_bytes(budget)}: the streamed feature map and "
                   f"its gradient ({format_bytes(streaming[0].feature_map_bytes)}) plus the "
                   f"model state already need {format_bytes(fixed)}; stream more layers "
                   f"(--stream-layers, now {stream_layers or 'whole trunk'}) or use a smaller "
                   "dtype")
        if stream_layers is None:
            message = (f"{size}: nothing fits {format_bytes(budget)}: even the model state and "
                       f"the feature map of the whole streamed trunk need "
                       f"{format_bytes(fixed)}; use a smaller model or dtype ({model_name})")
    elif streaming:
        smallest = min(streaming, key=lambda r: r.peak_bytes)
        message = (f"{size}: no tile fits {format_bytes(budget)} (smallest predicted peak "
                   f"{format_bytes(smallest.peak_bytes)} at tile {smallest.tile_size[1]}); try "
                   "smaller tiles, float16, or stream fewer/more layers")
        if any(r.engine == "halo" for r in streaming):
            message += " or --engine crop (keeps no halo strips, computes more)"
    else:
        message = (f"{size}: conventional training needs "
                   f"{format_bytes(conventional.peak_bytes)} > {format_bytes(budget)}; give "
                   "--tile-size values to see streaming options")
    return {"image_width": width, "image_height": height, "tile_size": None, "fits": False,
            "message": message}


def estimate_memory(config: EstimateConfig) -> MemoryReport:
    """Predicted peak training memory per image size, conventional and per tile size.

    `config.image_size` holds sizes as typed ("8192" or "8192x6144", width x height), its
    `tile_size` tile sides (empty: the DEFAULT_TILE_SIZES that fit the image) and its
    `memory_budget` a budget as typed ("12GiB", "12GB", "12e9") or None; see `EstimateConfig`.

    Returns a MemoryReport: its rows, the advice where a budget was given, and the
    engine's MemoryEstimate per size.

    Raises:
        ValueError: unknown model / split / dtype / optimizer, a size or budget that does not
            parse, a tile larger than an image (one line each).
    """
    model_name, sizes, stream_layers = config.model, config.image_size, config.stream_layers
    budget, engine, dtype = config.memory_budget, config.engine, config.dtype
    if model_name not in MODEL_NAMES:
        raise InputError(f"unknown model {model_name!r}; valid models: {', '.join(MODEL_NAMES)}")
    if not sizes:
        raise InputError("give at least one image size (--image-size 8192 or 8192x6144)")
    parsed_sizes = [parse_size(s) for s in sizes]
    tiles = sorted({parse_tile_size(t) for t in config.tile_size})
    budget_bytes = parse_bytes(budget) if budget is not None else None
    for height, width in parsed_sizes:
        for tile in tiles:
            if tile > min(height, width):
                raise InputError(f"tile size {tile} is larger than the image {width}x{height}")
    model = build_model(ModelConfig(model_name, num_classes=config.num_classes,
                                    stream_layers=stream_layers, pooling=config.pooling))
    result = MemoryReport(model_name, stream_layers, engine, dtype, config.optimizer,
                          budget_bytes)
    for height, width in parsed_sizes:
        chosen = tiles or [t for t in DEFAULT_TILE_SIZES if t <= min(height, width)]
        estimate = estimate_training_memory(model.stream, model.head, (height, width), chosen,
                                            dtype=dtype, optimizer=config.optimizer,
                                            engine=engine)
        result.estimates.append(estimate)
        result.rows.extend(_row_dict(estimate, row) for row in estimate.rows)
        if budget_bytes is not None:
            result.advice.append(_advice(estimate, budget_bytes, stream_layers, model_name))
    return result


def plot_estimate(path: str | Path, config: EstimateConfig, result: MemoryReport) -> Path:
    """`write_memory_plot` for what `estimate_memory(config)` found (`--plot`): at the largest
    square tile that fits the budget, else the first tile asked for, else 1024 (at most the
    image's side), for image sides up to 65536 or the first image's, if larger."""
    fitting = [a["tile_size"] for a in result.advice if a["tile_size"] is not None]
    side = min(result.estimates[0].image_size)
    tile = (fitting[0] if fitting and isinstance(fitting[0], int)  # a square tile
            else parse_tile_size(config.tile_size[0]) if config.tile_size else min(1024, side))
    return write_memory_plot(path, config.model, config.stream_layers, tile, config.dtype,
                             config.optimizer, result.budget_bytes, max_size=max(65536, side),
                             engine=config.engine)


def write_memory_plot(path: str | Path, model_name: str, stream_layers: str | None,
                      tile_size: int, dtype: str = "float32", optimizer: str = "adamw",
                      budget_bytes: int | None = None, max_size: int = 65536,
                      engine: str = "auto") -> Path:
    """PNG: predicted peak (GiB, log) against image side (log), conventional vs streaming at
    `tile_size`, with the budget as a horizontal line. Sizes: powers of two from the tile up
    to `max_size`. Written atomically."""
    from sstream.plots import Panel, Series, line_plot

    model = build_model(ModelConfig(model_name, stream_layers=stream_layers))
    sides = [tile_size]
    while sides[-1] * 2 <= max(max_size, tile_size):
        sides.append(sides[-1] * 2)
    conventional, streaming = [], []
    for side in sides:
        estimate = estimate_training_memory(model.stream, model.head, (side, side),
                                            [tile_size], dtype=dtype, optimizer=optimizer,
                                            engine=engine)
        conventional.append(estimate.rows[0].peak_bytes / 2**30)
        streaming.append(estimate.rows[1].peak_bytes / 2**30)
    panel = Panel(
        title=(f"{model_name} (stream {stream_layers or 'whole trunk'}), {dtype}, {optimizer}: "
               "predicted peak memory of one training step"),
        series=[Series("conventional", sides, conventional),
                Series(f"streaming, tile {tile_size}", sides, streaming)],
        xlabel="image side (pixels)", ylabel="peak memory (GiB)", log_x=True, log_y=True,
        hlines=[(budget_bytes / 2**30, f"budget {format_bytes(budget_bytes)}")]
        if budget_bytes else [])
    return line_plot(path, [panel])
