"""The model zoo: a CNN split into a streamed trunk (`stream`) and an ordinary `head`.

A `Classifier` is one ordinary `nn.Module`:

    x (N, 3, H, W), float pixels / 255 in [0, 1]
      -> stream: Normalize (ImageNet mean/std, per pixel) + trunk stages up to the split point
         (N, C', H', W')  -- this is what `StreamingCNN(model.stream, tile)` wraps
      -> head: the remaining trunk stages, global max/avg pooling, flatten, dropout, linear
         (N, num_classes) logits; a regression model's head ends with a TargetScale and
         gives (N, targets) predicted values in the label's units (`sstream.task`)

Backbones (torchvision constructors with `weights=None`; nothing is downloaded unless
`pretrained=True` is asked for explicitly):

    model           split points (`stream_layers`)                   stream stride at the end
    tiny            stage1 .. stage4  (conv-BN-ReLU-maxpool each)     2, 4, 8, 16
    resnet18/34/50  layer1 .. layer4  (stem conv1/bn1/relu/maxpool    4, 8, 16, 32
                                       always streams)
    convnext_tiny   stage1 .. stage4  (stage k = downsample + blocks; 4, 8, 16, 32
                                       stage1 includes the 4x4 stem)
    vgg16           block1 .. block5  (convs of a block + its maxpool) 2, 4, 8, 16, 32

`stream_layers=None` streams the whole trunk, so the head is only pooling + linear.

BatchNorm and streaming: a tile cannot see the statistics of the whole image, so a streamed
BatchNorm must use frozen running statistics (eval mode). `freeze_batchnorm(model, ...)` puts
every BatchNorm in eval mode and marks it; `Classifier.train()` keeps marked BatchNorms in eval
mode, so the usual `model.train()` / `model.eval()` calls of a training loop are safe.

Checkpoints (`checkpoint_payload`, `seal` / `read_checkpoint`, `load_checkpoint`) are
torch.save'd dicts

    {"format": "sstream-checkpoint/1", "model_config": ModelConfig.to_dict(),
     "model": Classifier.state_dict(), ...any training keys, ignored when loading...,
     "integrity": {"blake2b": digest of everything else}}

and load with `torch.load(..., weights_only=True)` (no code runs); a file whose contents do
not match its digest is refused.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sstream.engine.attention import AttentionPooling
from sstream.engine.geometry import eval_mode, meta_call
from sstream.engine.pooling import head_global_pool
from sstream.errors import InputError, SstreamError
from sstream.runtime import autocast
from sstream.task import TASKS, TargetScale

if TYPE_CHECKING:
    from sstream.engine import ImageSource, InputGradSink, StreamingCNN

__all__ = [
    "CHECKPOINT_FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "Classifier",
    "ModelConfig",
    "Normalize",
    "build_model",
    "checkpoint_payload",
    "freeze_batchnorm",
    "head_global_pool",
    "load_backbone_weights",
    "load_checkpoint",
    "minimum_input_size",
    "payload_digest",
    "read_checkpoint",
    "seal",
    "split_names",
    "streamed_logits",
]

MODEL_NAMES = ("tiny", "resnet18", "resnet34", "resnet50", "convnext_tiny", "vgg16")
POOLINGS = ("max", "avg", "attention")
CHECKPOINT_FORMAT = "sstream-checkpoint/1"
INTEGRITY_KEY = "integrity"  # {"blake2b": payload_digest of everything else}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """What to build. Everything needed to rebuild a trained model travels in checkpoints.

    Attributes:
        name: one of MODEL_NAMES.
        num_classes: outputs of the final linear layer (classes, or regression targets).
        stream_layers: split point: stream up to and including this named stage (see the
            module docstring; `split_names(name)` lists them); None streams the whole trunk.
        pooling: global pooling of the head, "max", "avg" or "attention" (CLAM-SB's gated
            attention, one head: `sstream.engine.attention.AttentionPooling`).
        attention_hidden: the gated attention's hidden size (pooling "attention").
        dropout: dropout probability before the final linear layer (in the head, so it may be
            random: the head is not re-run per tile).
        tissue: what the global pooling ran over in training: "auto" (detected tissue, see
            `sstream.tissue`) or "none" (every position; checkpoints from before tissue
            masks); predict and saliency do the same unless told otherwise.
        task: "classification" (outputs are logits) or "regression" (outputs are the
            predicted values in the label's units: the head ends with a TargetScale);
            see `sstream.task`.
        targets: the regression targets' names (one per output); None for classification.
        class_names: the classes' names, in output order, where the labels were names
            (`tumor`, `normal`); None for integer labels (the names are "0".."K-1").
        stain_normalize: the stain normalisation training applied ("macenko" or
            "reinhard", fitted on each slide: `sstream.stain`), which predict and saliency
            apply too; None for none.
        read: how training read its images (`sstream.reading.ReadSpec.record`: level or
            mpp, image size); None for checkpoints from before the record (level 0, whole).
        tile_size: the tile side training streamed with: predict's default. None: unknown.
    """

    name: str = "tiny"
    num_classes: int = 2
    stream_layers: str | None = None
    pooling: str = "max"
    attention_hidden: int = 128
    dropout: float = 0.0
    tissue: str = "none"
    task: str = "classification"
    targets: list[str] | None = None
    class_names: list[str] | None = None
    stain_normalize: str | None = None
    read: dict[str, Any] | None = None
    tile_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON- and weights_only-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError (a newer or foreign format)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown model config keys {unknown}; expected some of "
                             f"{sorted(known)}")
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError for an unknown name, split point, pooling or a bad number."""
        if self.name not in MODEL_NAMES:
            raise InputError(f"unknown model {self.name!r}; valid models: "
                             f"{', '.join(MODEL_NAMES)}")
        valid = split_names(self.name)
        if self.stream_layers is not None and self.stream_layers not in valid:
            raise InputError(f"unknown stream_layers {self.stream_layers!r} for {self.name}; "
                             f"valid split points: {', '.join(valid)} (or None for the "
                             "whole trunk)")
        if self.pooling not in POOLINGS:
            raise InputError(f"unknown pooling {self.pooling!r}; valid: {', '.join(POOLINGS)}")
        if int(self.attention_hidden) != self.attention_hidden or self.attention_hidden < 1:
            raise InputError(f"attention_hidden must be a positive integer, got "
                             f"{self.attention_hidden}")
        if int(self.num_classes) != self.num_classes or self.num_classes < 1:
            raise InputError(f"num_classes must be a positive integer, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tissue not in ("auto", "none"):
            raise InputError(f"tissue must be 'auto' or 'none', got {self.tissue!r}")
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.task == "regression" and len(self.targets or ()) != self.num_classes:
            raise InputError(f"a regression model has one output per target: "
                             f"{self.num_classes} outputs, targets {self.targets}")


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers shaped (1, C, 1, 1), so it is per pixel and
    streams. Input: (N, C, H, W) pixels / 255."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """stream (streamable trunk) + head (rest of the trunk, pooling, linear).

    `forward(x)` runs both on the whole image: the plain-PyTorch reference. For training on
    big images wrap `model.stream` in `StreamingCNN` and apply `model.head` to its output.
    `forward(x, mask=...)` pools over the mask's positions only, as predict and training do
    with a tissue mask (`sstream.reading.model_input` gives predict's x and mask).

    `train(mode)` keeps BatchNorms marked by `freeze_batchnorm` in eval mode.
    """

    def __init__(self, config: ModelConfig, stream: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__()
        self.config = config
        self.stream = stream
        self.head = head

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) pixels / 255 -> (N, outputs). `mask`: bool (H', W') at the stream's
        output resolution (tissue); the head's global pooling then runs over True positions
        only: max as if the others were -inf, mean over the True ones. ValueError for a mask
        on a head that does not start with global pooling."""
        features = self.stream(x)  # (N, C', H', W')
        if mask is None:
            return self.head(features)
        pooling = head_global_pool(self.head)
        if pooling is None:
            raise InputError("a mask needs a head that starts with global pooling (stream "
                             "the whole trunk: no --stream-layers)")
        if pooling == "attention":
            return self.head[1:](self.head[0](features, mask))  # (N, 1, C') -> (N, outputs)
        keep = mask.to(features.device, torch.bool)  # (H', W')
        if pooling == "max":
            pooled = features.masked_fill(~keep, -torch.inf).amax(dim=(2, 3))  # (N, C')
        else:
            pooled = (features * keep).sum(dim=(2, 3)) / keep.sum()
        return self.head[1:](pooled[..., None, None])  # (N, C', 1, 1) -> (N, outputs)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for module in self.modules():
            if getattr(module, "_sstream_frozen_bn", False):
                module.eval()
        return self


def freeze_batchnorm(model: nn.Module, train_affine: bool) -> None:
    """Put every BatchNorm in `model` in eval mode (frozen running statistics) and mark it.

    Affine weight and bias get `requires_grad = train_affine`. A `Classifier` keeps marked
    BatchNorms in eval mode through later `.train()` calls; for other modules, call this
    again after `.train()`.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            module._sstream_frozen_bn = True  # read by Classifier.train
            for param in (module.weight, module.bias):
                if param is not None:
                    param.requires_grad_(train_affine)


# --------------------------------------------------------------------------------------------
# Backbones: each builder returns (backbone, stages, channels, extra_head, ignored_prefixes)
#   backbone: the module whose state_dict a --weights file must match (torchvision format)
#   stages:   ordered (name, module) of the trunk; split points are the names in SPLITS
#   channels: feature channels after the last stage (the linear layer's input)
#   extra_head: modules applied after pooling + flatten, before dropout + linear
#   ignored_prefixes: weights-file keys of the replaced classifier, skipped when loading


@dataclass
class _Backbone:
    module: nn.Module
    stages: list[tuple[str, nn.Module]]
    channels: int
    extra_head: list[tuple[str, nn.Module]]
    ignored_prefixes: tuple[str, ...]


_SPLITS: dict[str, tuple[str, ...]] = {
    "tiny": ("stage1", "stage2", "stage3", "stage4"),
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet34": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
    "convnext_tiny": ("stage1", "stage2", "stage3", "stage4"),
    "vgg16": ("block1", "block2", "block3", "block4", "block5"),
}


def split_names(name: str) -> tuple[str, ...]:
    """Valid `stream_layers` values for model `name` (ValueError for an unknown model)."""
    if name not in _SPLITS:
        raise InputError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return _SPLITS[name]


class _TinyTrunk(nn.Sequential):
    """Four conv3x3-BN-ReLU-maxpool2 stages, 16-32-64-64 channels, output stride 16."""

    def __init__(self) -> None:
        stages = []
        for index, (c_in, c_out) in enumerate([(3, 16), (16, 32), (32, 64), (64, 64)]):
            stages.append((f"stage{index + 1}", nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True), nn.MaxPool2d(2))))
        super().__init__(OrderedDict(stages))


def _tiny() -> _Backbone:
    trunk = _TinyTrunk()
    return _Backbone(trunk, list(trunk.named_children()), 64, [], ())


def _torchvision() -> ModuleType:
    """torchvision, imported when a backbone needs it: its import alone grows the resident set
    by ~160 MiB, which `tiny` (and a saliency run's memory budget) can do without."""
    import torchvision

    return torchvision


def _resnet(name: str) -> _Backbone:
    net = getattr(_torchvision().models, name)(weights=None)
    stem = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
    layers = [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    return _Backbone(net, stem + layers, net.fc.in_features, [], ("fc.",))


def _convnext_tiny() -> _Backbone:
    # Stochastic depth off: a streamed block re-run for the backward must give the same output.
    # torchvision's StochasticDepth(p=0) is the identity but its traced function is unknown
    # to the engine's table of local ops; the Identity streams.
    torchvision = _torchvision()
    net = torchvision.models.convnext_tiny(weights=None, stochastic_depth_prob=0.0)
    for block in net.modules():
        if isinstance(getattr(block, "stochastic_depth", None), torchvision.ops.StochasticDepth):
            block.stochastic_depth = nn.Identity()
    f = net.features
    stages = [("stem", f[0]), ("stage1", f[1]),
              ("stage2", nn.Sequential(OrderedDict(downsample=f[2], blocks=f[3]))),
              ("stage3", nn.Sequential(OrderedDict(downsample=f[4], blocks=f[5]))),
              ("stage4", nn.Sequential(OrderedDict(downsample=f[6], blocks=f[7])))]
    # torchvision's classifier is LayerNorm2d -> Flatten -> Linear; keep its (loadable) norm as
    # a LayerNorm over channels after pooling, replace the Linear.
    norm = nn.LayerNorm(768, eps=1e-6)
    norm.load_state_dict(net.classifier[0].state_dict())
    net.classifier[0] = norm  # so that a weights file's classifier.0.* lands in the head
    return _Backbone(net, stages, 768, [("norm", norm)], ("classifier.2.",))


class _VGG16Features(nn.Module):
    """torchvision's vgg16 without its 120M-parameter classifier (replaced by our head anyway):
    same `features.*` keys and initialisation, built in a fraction of the time and memory."""

    def __init__(self) -> None:
        super().__init__()
        vgg = _torchvision().models.vgg
        self.features = vgg.make_layers(vgg.cfgs["D"])
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)


def _vgg16() -> _Backbone:
    net = _VGG16Features()
    f = net.features
    bounds = [0, 5, 10, 17, 24, 31]  # each block ends with its MaxPool2d (indices 4, 9, ...)
    stages = [(f"block{i + 1}", nn.Sequential(*f[bounds[i]:bounds[i + 1]])) for i in range(5)]
    return _Backbone(net, stages, 512, [], ("classifier.",))


_BUILDERS: dict[str, Callable[[], _Backbone]] = {
    "tiny": _tiny,
    "resnet18": lambda: _resnet("resnet18"),
    "resnet34": lambda: _resnet("resnet34"),
    "resnet50": lambda: _resnet("resnet50"),
    "convnext_tiny": _convnext_tiny,
    "vgg16": _vgg16,
}


def build_model(config: ModelConfig, weights: str | Path | None = None,
                pretrained: bool = False) -> Classifier:
    """Build the Classifier described by `config`.

    Args:
        config: model name, classes, split point, pooling, dropout.
        weights: a torchvision-format state dict file (e.g. downloaded ImageNet weights) for
            the backbone; the original classifier's keys are ignored. See
            `load_backbone_weights`.
        pretrained: load torchvision's default ImageNet weights through its weights API
            (needs network access or a filled torch hub cache).

    Raises:
        ValueError: unknown model / split point / pooling, or a weights file that does not fit.
        RuntimeError: `pretrained=True` and the weights cannot be fetched (offline).
    """
    config.validate()
    if weights is not None and pretrained:
        raise InputError("give either weights=PATH or pretrained=True, not both")
    backbone = _BUILDERS[config.name]()
    if weights is not None:
        load_backbone_weights(backbone.module, weights, backbone.ignored_prefixes,
                              what=config.name)
    elif pretrained:
        _load_pretrained(backbone, config.name)

    names = [name for name, _ in backbone.stages]
    split = len(names) if config.stream_layers is None else names.index(config.stream_layers) + 1
    stream = nn.Sequential(OrderedDict([("normalize", Normalize()), *backbone.stages[:split]]))
    pool = _pooling(config, backbone.channels)
    head = nn.Sequential(OrderedDict([
        *backbone.stages[split:], ("pool", pool), ("flatten", nn.Flatten(1)),
        *backbone.extra_head, ("dropout", nn.Dropout(config.dropout)),
        ("fc", nn.Linear(backbone.channels, config.num_classes)),
        *([("scale", TargetScale(config.num_classes))] if config.task == "regression" else [])]))
    return Classifier(config, stream, head)


def _pooling(config: ModelConfig, channels: int) -> nn.Module:
    """The head's first module: global max or average pooling, or gated attention pooling
    (made only when asked for: its weights draw from the RNG)."""
    if config.pooling == "attention":
        return AttentionPooling(channels, config.attention_hidden)
    return nn.AdaptiveMaxPool2d(1) if config.pooling == "max" else nn.AdaptiveAvgPool2d(1)


def _summarise(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def _torch_load(path: Path, what: str, advice: str, map_location: str | torch.device = "cpu",
                data: bytes | None = None) -> Any:
    """torch.load of `path` (or of `data`, its bytes) with weights_only (no code runs),
    every failure one ValueError ending in `advice`: the unpickler raises anything
    (IndexError on a text file, KeyError, zip errors...) on what is not a torch file, and a
    truncated or corrupted one."""
    try:
        return torch.load(path if data is None else io.BytesIO(data),
                          map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - the unpickler's errors are anybody's
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() \
            else type(exc).__name__
        raise InputError(f"{path}: not a readable {what} (not a torch file, or a truncated or "
                         f"corrupted one: {first}); {advice}") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    loaded = _torch_load(path, "torch weights file", "give a state dict saved with torch.save")
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise InputError(f"{path}: expected a state dict (parameter name -> tensor)")
    return loaded


def load_backbone_weights(backbone: nn.Module, path: str | Path,
                          ignored_prefixes: tuple[str, ...] = (), what: str = "") -> None:
    """Load a state dict file into `backbone` exactly, or raise ValueError naming what differs.

    Keys starting with one of `ignored_prefixes` (the replaced classifier) are skipped. Every
    other key of the backbone must be present with the same shape and no foreign key may be
    left over: a file of another architecture never loads partially.
    """
    path = Path(path)
    state = _read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel files
    expected = {k: v for k, v in backbone.state_dict().items()
                if not k.startswith(ignored_prefixes)}
    given = {k: v for k, v in state.items() if not k.startswith(ignored_prefixes)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
                    for k in set(expected) & set(given) if given[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_summarise(shapes, 2)}")
        raise InputError(f"{path}: weights do not fit {what or type(backbone).__name__} "
                         f"(another architecture?): {'; '.join(parts)}")
    backbone.load_state_dict(given, strict=False)


class WeightsUnavailable(SstreamError, RuntimeError):
    """torchvision's pretrained weights cannot be fetched (offline, or a bad download)."""


def _load_pretrained(backbone: _Backbone, name: str) -> None:
    if name == "tiny":
        raise InputError("no pretrained weights exist for 'tiny'; use a torchvision model")
    try:
        weights = _torchvision().models.get_model_weights(name).DEFAULT
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket errors, hash mismatch: all mean "not here"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailable(
            f"could not fetch torchvision's ImageNet weights for {name} ({first}); offline? "
            f"download them elsewhere and pass --weights PATH") from None
    state = {k: v for k, v in state.items() if not k.startswith(backbone.ignored_prefixes)}
    backbone.module.load_state_dict(state, strict=False)


def streamed_logits(model: Classifier, scnn: StreamingCNN,
                    source: torch.Tensor | ImageSource, mask: torch.Tensor | None = None,
                    input_grad_sink: InputGradSink | None = None, whole_slide: bool = True,
                    ) -> torch.Tensor:
    """The model's logits (N, classes) with its stream run by `scnn` (a StreamingCNN wrapping
    `model.stream`), under autograd if grad is enabled.

    A head that starts with global pooling (`head_global_pool`) gets the pooled (N, C')
    vector from `scnn.global_pool` (or `scnn.attention_pool`): no feature map exists, at
    any slide size, and the backward re-runs only the tiles the gradient reaches (the
    whole-slide path; with `whole_slide=False`, the feature-map path, as for other heads).
    Other heads get the assembled feature map. `mask` (bool at the stream's output
    resolution: tissue) restricts the pooling and needs the whole-slide path;
    `input_grad_sink` receives the input gradient block by block (saliency). ValueError
    for a mask without it.
    """
    pool = head_global_pool(model.head) if whole_slide else None
    if pool == "attention":
        pooled = scnn.attention_pool(source, model.head[0].attention, mask,  # (N, 1, C')
                                     input_grad_sink)
        return model.head[1:](pooled)  # (N, 1, C') -> (N, classes)
    if pool is not None:
        pooled, _ = scnn.global_pool(source, pool, mask=mask, input_grad_sink=input_grad_sink)
        return model.head[1:](pooled[..., None, None])  # (N, C') -> (N, classes)
    if mask is not None:
        raise InputError("a tissue mask needs the whole-slide path: a head that starts with "
                         "global pooling (stream the whole trunk: no --stream-layers)")
    return model.head(scnn(source, input_grad_sink=input_grad_sink))


def model_outputs(model: Classifier, scnn: StreamingCNN, source: ImageSource | torch.Tensor,
                  amp: bool = False, dtype: torch.dtype = torch.bfloat16,
                  mask: torch.Tensor | None = None) -> np.ndarray:
    """The model's outputs (outputs,) for one image, float64, streamed without keeping
    gradients: logits, or predicted values (the task's `predictions` makes them final).

    When the head starts with global pooling, the stream's output is pooled tile by tile and
    never assembled, so the slide's size does not matter (`streamed_logits`); `mask` (bool at
    the stream's output resolution, `sstream.tissue.output_mask`) pools over tissue only."""
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, amp, dtype):
        outputs = streamed_logits(model, scnn, source, mask)  # (1, outputs)
    return outputs[0].double().cpu().numpy()


def training_path(model: Classifier, whole_slide: bool = True) -> str:
    """How a training step runs, for the start-up line: "whole-slide" where the head starts
    with global pooling (no feature map: the forward pools tile by tile and the backward
    re-runs only where the gradient goes) unless `whole_slide` is off, else "feature map"
    (the streamed feature map and its gradient are kept, as the head's conv stages need)."""
    pooled = whole_slide and head_global_pool(model.head) is not None
    return "whole-slide" if pooled else "feature map"


def minimum_input_size(model: Classifier | nn.Module, channels: int = 3) -> int:
    """The smallest square side (pixels) the model accepts in eval mode, found on meta."""
    with eval_mode(model):
        for side in range(1, 1025):
            try:
                meta_call(model, torch.empty((1, channels, side, side), device="meta"))
                return side
            except (RuntimeError, ValueError):
                continue
    raise InputError("the model accepts no input up to 1024 x 1024 pixels")


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_payload(model: Classifier) -> dict[str, Any]:
    """The model part of a checkpoint; add training keys (optimizer, epoch...), then
    `seal` it before torch.save."""
    return {"format": CHECKPOINT_FORMAT, "model_config": model.config.to_dict(),
            "model": model.state_dict()}


def seal(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` with its integrity digest (`payload_digest`), checked by every load."""
    sealed = {k: v for k, v in payload.items() if k != INTEGRITY_KEY}
    sealed[INTEGRITY_KEY] = {"blake2b": payload_digest(sealed)}
    return sealed


def payload_digest(payload: Any) -> str:
    """A BLAKE2b digest of everything a checkpoint holds, in a fixed order: tensors by their
    dtype, shape and bytes, other values by their repr. A flipped bit in any tensor or value
    changes it (a torch file has no checksum of its own: its zip entries are stored, and a
    changed byte in a tensor loads silently)."""
    digest = hashlib.blake2b(digest_size=32)

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r}".encode())

    visit(payload)
    return digest.hexdigest()


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    data: bytes | None = None) -> dict[str, Any]:
    """A checkpoint's payload, verified: an sstream checkpoint whose digest matches its
    contents (files written before digests are read unchecked). `data`: the file's bytes,
    read already (`path` then names it in messages).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError (one line naming the file, what it is not and what to do): not a torch
            file, truncated or corrupted (unreadable, or its digest does not match), a plain
            state dict or a Lightning checkpoint or another pickle, an unknown format.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    payload = _torch_load(path, "checkpoint", _CHECKPOINT_ADVICE, map_location, data)
    if not isinstance(payload, dict) or "format" not in payload:
        raise InputError(f"{path}: {_what_it_is(payload)}, not an sstream checkpoint; "
                         f"{_CHECKPOINT_ADVICE}")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: unsupported checkpoint format {payload['format']!r} "
                         f"(this version reads {CHECKPOINT_FORMAT!r})")
    seal_record = payload.get(INTEGRITY_KEY)
    if seal_record is not None:
        body = {k: v for k, v in payload.items() if k != INTEGRITY_KEY}
        if not isinstance(seal_record, dict) or seal_record.get("blake2b") != \
                payload_digest(body):
            raise InputError(f"{path}: corrupted: its contents do not match the checksum "
                             "written with it (a damaged copy?); use another copy, or "
                             "best.pt / last.pt of the run")
    for key in ("model_config", "model"):
        if not isinstance(payload.get(key), dict):
            raise InputError(f"{path}: sstream checkpoint without a valid {key!r} entry")
    return payload


_CHECKPOINT_ADVICE = "use a last.pt or best.pt written by `sstream train`"


def _what_it_is(payload: Any) -> str:
    """What a torch file that is not an sstream checkpoint holds, in a phrase."""
    if isinstance(payload, dict) and "pytorch-lightning_version" in payload:
        return "a PyTorch Lightning checkpoint"
    if isinstance(payload, dict) and payload and all(
            isinstance(v, torch.Tensor) for v in payload.values()):
        return ("a plain state dict (parameter name -> tensor: for a backbone, give it to "
                "`sstream train --weights`)")
    return f"a pickled {type(payload).__name__}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """The trained Classifier of a checkpoint written by `sstream train` (eval mode).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError (one line naming the file): see `read_checkpoint`; or a model config or
            weights that do not fit each other.
    """
    path = Path(path)
    payload = read_checkpoint(path, map_location)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = build_model(config)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: bad model_config: {exc}") from None
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise InputError(f"{path}: weights do not fit the model config {config}: {first}"
                         ) from None
    return model.eval()
