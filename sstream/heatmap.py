"""Region heatmaps of whole slides: where the model looked, at the stream's output resolution.

One value per output position (i, j) of the stream, written as a pyramidal float32 TIFF whose
pixel (i, j) covers the level's pixels [i s, (i + 1) s) x [j s, (j + 1) s) (s the stream's
output stride), with µm per pixel s times the level's, so it overlays the slide (`sstream
view`, QuPath, ASAP):

    attention head:   a[i, j], the softmax weight of position (i, j) in the pooling (sums to
                      1 over the tissue), from `StreamingCNN.attention_weights`
    max / avg head:   w_k . y[:, i, j] + b_k, the class activation map (Zhou et al. 2016) of
                      output k: the final linear layer applied to each position's features;
                      with avg pooling its mean over the tissue is output k itself

Off the tissue mask the map is 0. The forward streams the slide tile by tile (attention: two
passes, the first for the softmax's normaliser); the map, (H / s) x (W / s) floats, is the
only thing of the slide's extent held (s = 32: 1 MB for a 32768 px square slide).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sstream.engine import StreamingCNN
from sstream.engine.pooling import GlobalPool
from sstream.engine.tiling import OutputMask
from sstream.errors import InputError
from sstream.io import TiffMapWriter
from sstream.io.geojson import DEFAULT_PERCENTILE, map_features, threshold_at, write_geojson
from sstream.models import Classifier, head_global_pool, load_checkpoint, minimum_input_size
from sstream.options import AS_TRAINED, ASSUME_MPP_HELP, DEVICE_HELP, Options, option
from sstream.reading import ReadSpec
from sstream.runtime import resolve_device
from sstream.stain import slide_normaliser
from sstream.task import task_for_model
from sstream.tissue import Tissue, output_mask

__all__ = ["HeatmapConfig", "HeatmapError", "HeatmapResult", "class_activation_map",
           "compute_heatmap"]

MAP_TILE = 256  # TIFF tile edge of the written map

HeatmapProgress = Callable[[str, int, int], None]
"""Called as (phase, tiles done, tiles in all)."""


class HeatmapError(InputError):
    """A model or option that has no heatmap (one line)."""


@dataclass
class HeatmapConfig(Options):
    """How `sstream heatmap` maps a slide: the options' defaults and help. The slide, the
    checkpoint and the files written are `compute_heatmap`'s arguments."""

    index: int | str | None = option(
        None, "Max/avg heads: the class (name or index; a regression's target index) whose "
        "activation map is drawn.", shown="the predicted class")
    level: int | None = option(None, "Slide pyramid level to read.", shown=AS_TRAINED)
    mpp: float | None = option(None, "Read at exactly this many µm per pixel.",
                               shown=AS_TRAINED)
    assume_mpp: float | None = option(None, ASSUME_MPP_HELP)
    tile_size: int = option(512, "Streaming tile side in pixels.")
    device: str = option("auto", DEVICE_HELP)
    tissue: str | None = option(None, "auto, none or a mask image: the map is zero off the "
                                "tissue.", shown=AS_TRAINED)
    contour_percentile: float = option(DEFAULT_PERCENTILE, "--geojson: outline the regions at "
                                       "or above this percentile of the map's non-zero "
                                       "values.")
    overwrite: bool = option(False, "Replace existing outputs.")

    def validate(self) -> None:
        """HeatmapError for a value that cannot work."""
        if not 0 < self.contour_percentile < 100:
            raise HeatmapError(f"the contour percentile must be in (0, 100), got "
                               f"{self.contour_percentile}")


@dataclass
class HeatmapResult:
    out: Path
    kind: str  # "attention" or "cam"
    index: int | None  # the output the CAM is of; None for attention
    summary: str  # the prediction, in one line
    size: tuple[int, int]  # (width, height) of the map
    stride: int  # level pixels per map pixel
    mpp: float | None  # µm per map pixel
    min: float
    max: float
    seconds: float


def compute_heatmap(slide_path: str | os.PathLike, checkpoint: str | os.PathLike | Classifier,
                    out: str | os.PathLike, config: HeatmapConfig | None = None,
                    progress: HeatmapProgress | None = None,
                    geojson: str | os.PathLike | None = None, **options: Any) -> HeatmapResult:
    """Write the attention map or class activation map of a slide (module docstring).

    Args:
        slide_path: as for `saliency`.
        checkpoint: an sstream checkpoint file, or a Classifier.
        out: the map's TIFF path (written atomically).
        config: how the slide is mapped (`HeatmapConfig`; default: its defaults), and
            options: any of its fields by name, in place of the config's. level, mpp,
            assume_mpp, tissue, tile_size, device: as for `saliency` (None: as the model
            was trained). index: a max/avg head's output whose CAM is drawn (a class's name
            or index; None: the predicted class, or a regression's first target). Not for
            attention heads. device may also be a torch.device.
        geojson: also write the regions at or above the config's `contour_percentile` of
            the map's non-zero values as QuPath annotations (`sstream.io.geojson`), in
            level-0 pixels.

    Raises:
        HeatmapError: a head without global pooling first (a split trunk) or with layers
            between the pooling and the final linear layer, an index for an attention head.
        FileExistsError, sstream.io.ImageReadError, ValueError: as `saliency`.
    """
    started = time.perf_counter()
    config = replace(config or HeatmapConfig(), **options)
    config.validate()
    index, overwrite = config.index, config.overwrite
    out = Path(out)
    for path in (out, geojson):
        if path is not None and Path(path).exists() and not overwrite:
            raise FileExistsError(f"{path} exists (use --overwrite to replace it)")
    device = (config.device if isinstance(config.device, torch.device)
              else resolve_device(config.device))
    model = (checkpoint.to(device) if isinstance(checkpoint, Classifier)
             else load_checkpoint(checkpoint, map_location=device)).eval()
    kind = _kind(model, index)
    task = task_for_model(model)
    with ExitStack() as stack:
        trained = replace(ReadSpec.for_model(model.config), image_size=None)
        spec = trained.overridden(config.level, config.mpp, None, config.tissue,
                                  config.assume_mpp)
        Tissue.parse(spec.tissue)
        read = stack.enter_context(spec.open(slide_path))
        source = read.source
        source.stain = slide_normaliser(model.config.stain_normalize, read)
        smallest = minimum_input_size(model)
        if min(source.height, source.width) < smallest:
            raise InputError(f"{read.slide.path}: the image read is {source.width} x "
                             f"{source.height} pixels, smaller than the {smallest} x "
                             f"{smallest} the model accepts")
        scnn = StreamingCNN(model.stream, config.tile_size)
        scnn.on_tile = progress
        mask = output_mask(source, scnn)
        with torch.no_grad():
            if kind == "attention":
                outputs, heatmap = attention_map(model, scnn, source, mask)
                chosen, prediction = task.explained(outputs[0], None)
            else:
                outputs, maps = class_activation_map(model, scnn, source, mask)
                chosen, prediction = task.explained(outputs[0], None if index is None
                                                    else task.output_index(index))
                heatmap = maps[chosen]
        stride = scnn.geometry.stride[0]
        map_mpp = None if read.resolution.mpp is None else read.resolution.mpp * stride
        record = {"sstream": "heatmap", "kind": kind, "slide": read.slide.path.name,
                  "level": read.resolution.level, "stride": stride, "mpp": map_mpp,
                  "encoding": "float32", **prediction}
        with TiffMapWriter(out, heatmap.shape, np.float32, tile_size=MAP_TILE, mpp=map_mpp,
                           description=json.dumps(record), overwrite=overwrite) as writer:
            writer.write_band(0, heatmap)
        if geojson is not None:
            name = "attention" if kind == "attention" else task.output_name(chosen)
            write_geojson(geojson, map_features(
                heatmap, threshold_at(heatmap, config.contour_percentile),
                lambda y, x: source.level0(y * stride, x * stride), name))
    return HeatmapResult(out, kind, None if kind == "attention" else chosen,
                         task.summary(prediction), (heatmap.shape[1], heatmap.shape[0]),
                         stride, map_mpp, float(heatmap.min()), float(heatmap.max()),
                         time.perf_counter() - started)


def _kind(model: Classifier, index: int | str | None) -> str:
    """"attention" or "cam" for the model's head; HeatmapError where it has neither."""
    pooling = head_global_pool(model.head)
    if pooling is None:
        raise HeatmapError("a heatmap needs a head that starts with pooling (a model that "
                           "streams its whole trunk: trained without --stream-layers)")
    if pooling == "attention":
        if index is not None:
            raise HeatmapError("an attention head has one attention map: drop --class")
        return "attention"
    _final_linear(model.head)
    return "cam"


def attention_map(model: Classifier, scnn: StreamingCNN, source, mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, np.ndarray]:
    """(outputs (1, K), the attention weights (H', W') float32) of an attention head."""
    pooled, blocks = scnn.attention_weights(source, model.head[0].attention, mask)
    heatmap = np.zeros(scnn.output_size(source.shape), np.float32)
    for (y0, y1, x0, x1), weights in blocks:  # weights (1, 1, h, w)
        heatmap[y0:y1, x0:x1] = weights[0, 0].float().cpu().numpy()
    return model.head[1:](pooled), heatmap


def class_activation_map(model: Classifier, scnn: StreamingCNN, source,
                         mask: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
    """(outputs (1, K), CAMs (K, H', W') float32) of a max or avg head, in one forward
    pass: each region's features go through the final linear layer position by position
    (0 off the mask) and into the head's global pooling, which gives the outputs."""
    linear = _final_linear(model.head)
    size = scnn.output_size(source.shape)
    maps = np.zeros((linear.out_features, *size), np.float32)
    output_mask_ = None if mask is None else OutputMask(mask, size, 1)
    pool = GlobalPool(head_global_pool(model.head), size, output_mask_)
    for box, region in _regions(scnn, source, mask):
        y0, y1, x0, x1 = box
        pool.add(box, region)
        cam = torch.einsum("kc,nchw->nkhw", linear.weight.to(region.dtype), region) \
            + linear.bias.to(region.dtype)[:, None, None]  # (1, K, h, w)
        if output_mask_ is not None:
            cam = cam * output_mask_.block(box, cam.device)
        maps[:, y0:y1, x0:x1] = cam[0].float().cpu().numpy()
    return model.head[1:](pool.values[..., None, None]), maps


def _regions(scnn: StreamingCNN, source, mask: torch.Tensor | None
             ) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    for box, region in scnn.output_regions(source, mask):
        if region.shape[-2] * region.shape[-1]:
            yield box, region


def _final_linear(head: nn.Module) -> nn.Linear:
    """The head's final linear layer, where only flatten, dropout and a regression's
    affine scale lie between it and the pooling; else HeatmapError (a CAM would not be
    linear in the features)."""
    between = [m for m in list(head)[1:] if not isinstance(m, (nn.Flatten, nn.Dropout))]
    linear, rest = between[0], between[1:]
    if not isinstance(linear, nn.Linear) or any(type(m).__name__ != "TargetScale"
                                                for m in rest):
        raise HeatmapError("a class activation map needs the final linear layer right after "
                           "the pooling; this model's head has "
                           f"{type(linear).__name__} there")
    return linear
