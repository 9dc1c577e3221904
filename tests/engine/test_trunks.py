"""The convolutional trunks of torchvision models stream exactly (float64, eval-mode BN).

Whole trunks are checked on small images (their receptive fields are larger than the image,
so this checks tracing, strides and padding); partial trunks are checked on images larger
than two tiles plus the receptive field, where tiling really cuts the image.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sstream
from tests.engine.helpers import assert_streaming_exact, randomise_batchnorm


def resnet_trunk(name: str, upto: str = "layer4") -> nn.Module:
    net = getattr(torchvision.models, name)()
    stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(*[getattr(net, s) for s in stages[: stages.index(upto) + 1]])


TRUNKS = {
    "resnet18": lambda: resnet_trunk("resnet18"),
    "resnet34": lambda: resnet_trunk("resnet34"),
    "resnet50": lambda: resnet_trunk("resnet50"),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny().features,
    "vgg11": lambda: torchvision.models.vgg11().features,
    "vgg16": lambda: torchvision.models.vgg16().features,
    "densenet121": lambda: torchvision.models.densenet121().features,
}


def prepared(stream: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    stream = stream.double().eval()
    randomise_batchnorm(stream)
    return stream


@pytest.mark.parametrize("name", sorted(TRUNKS))
def test_whole_trunk_matches_plain_autograd(name):
    stream = prepared(TRUNKS[name](), seed=0)
    image = torch.randn(1, 3, 69, 75, dtype=torch.float64)
    assert sstream.StreamingCNN(stream, 32).engine_for(image.shape) == "halo"
    assert_streaming_exact(stream, image, tile_size=32)


@pytest.mark.parametrize(("name", "size", "tile"), [
    ("resnet18_layer2", (211, 190), 64),
    ("resnet50_layer1", (150, 133), 48),
    ("convnext_stage1", (150, 141), 40),
    ("vgg16_block2", (100, 87), 32),
])
def test_partial_trunk_is_really_tiled(name, size, tile):
    partial = {
        "resnet18_layer2": lambda: resnet_trunk("resnet18", "layer2"),
        "resnet50_layer1": lambda: resnet_trunk("resnet50", "layer1"),
        "convnext_stage1": lambda: torchvision.models.convnext_tiny().features[:2],
        "vgg16_block2": lambda: torchvision.models.vgg16().features[:10],
    }[name]
    stream = prepared(partial(), seed=1)
    plan = sstream.StreamingCNN(stream, tile).plan((1, 3, *size))
    assert len(plan) >= 4 and plan.largest_crop[0] < size[0] and plan.largest_crop[1] < size[1]
    assert_streaming_exact(stream, torch.randn(1, 3, *size, dtype=torch.float64), tile)
