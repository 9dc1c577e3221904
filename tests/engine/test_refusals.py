"""What cannot be streamed exactly is refused with UnsupportedModuleError naming the module."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sstream


class PositionalBias(nn.Module):
    """Adds a learned per-position map: ties outputs to absolute positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(1, 4, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias


class ShapeDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.shape[-1]


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return self.attn(tokens, tokens, tokens)[0].transpose(1, 2).reshape(n, c, h, w)


class SpatialCat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=3)


def conv() -> nn.Conv2d:
    return nn.Conv2d(3, 3, 3, padding=1)


REFUSED = {
    "batchnorm_training": (lambda: nn.Sequential(conv(), nn.BatchNorm2d(3).train()), "'1'",
                           "training mode"),
    "groupnorm": (lambda: nn.Sequential(conv(), nn.GroupNorm(1, 3)), "GroupNorm", "statistics"),
    "instancenorm": (lambda: nn.Sequential(conv(), nn.InstanceNorm2d(3)), "InstanceNorm2d",
                     "statistics"),
    "adaptive_pool": (lambda: nn.Sequential(conv(), nn.AdaptiveAvgPool2d(1)),
                      "AdaptiveAvgPool2d", "global pooling"),
    "adaptive_max": (lambda: nn.Sequential(conv(), nn.AdaptiveMaxPool2d(2)),
                     "AdaptiveMaxPool2d", "global pooling"),
    "upsample": (lambda: nn.Sequential(conv(), nn.Upsample(scale_factor=2)), "Upsample",
                 "upsampling"),
    "transposed_conv": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 3, 2, 2)),
                        "ConvTranspose2d", "transposed"),
    "reflect_padding": (lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1,
                                                        padding_mode="reflect")),
                        "Conv2d", "padding_mode"),
    "dropout_training": (lambda: nn.Sequential(conv(), nn.Dropout(0.2).train()), "Dropout",
                         "random"),
    "positional_bias": (PositionalBias, "PositionalBias", "absolute positions"),
    "shape_dependent": (ShapeDependent, "ShapeDependent", ".shape"),
    "untraceable": (DataDependent, "DataDependent", "torch.fx could not trace"),
    "attention": (Attention, "Attention", ".shape"),
    "spatial_concat": (SpatialCat, "SpatialCat", "spatial dimension"),
    "flatten": (lambda: nn.Sequential(conv(), nn.Flatten()), "Flatten", "flattening"),
    "unknown_leaf": (lambda: nn.Sequential(conv(), nn.Softmax2d()), "Softmax2d",
                     "not a recognised local operation"),
    "squeeze_excitation": (lambda: torchvision.models.mobilenet_v3_small().features.eval(),
                           "avgpool", "global pooling"),
    "efficientnet": (lambda: torchvision.models.efficientnet_b0().features.eval(),
                     "avgpool", "global pooling"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_module_named(case):
    build, name, reason = REFUSED[case]
    stream = build()
    for m in stream.modules():  # eval everything except what the case put in training mode
        if not isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
            m.training = False
    image = torch.randn(1, 3, 32, 32)
    with pytest.raises(sstream.UnsupportedModuleError) as info:
        sstream.StreamingCNN(stream, 16)(image)
    message = str(info.value)
    assert name in message and reason in message, message
    assert isinstance(info.value, ValueError)


def test_training_mode_refused_at_call_and_accepted_after_eval():
    """Construction analyses eval mode; the call refuses what the current mode cannot do."""
    stream = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))
    scnn = sstream.StreamingCNN(stream, 16)  # a fresh module is in training mode
    image = torch.randn(1, 3, 40, 40)
    with pytest.raises(sstream.UnsupportedModuleError, match="BatchNorm"):
        scnn(image)
    stream.eval()
    assert torch.allclose(scnn(image), stream(image), atol=1e-6)
    stream.train()
    with pytest.raises(sstream.UnsupportedModuleError, match="'1' \\(BatchNorm2d\\)"):
        scnn(image)
    assert all(m.training for m in stream.modules()), "analysis must not change modes"


def test_layout_aware_per_pixel_ops_accepted():
    """Channels-last per-pixel ops (ConvNeXt style) stream; over a spatial dim they do not."""

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm(8)
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            y = self.linear(self.norm(self.conv(x).permute(0, 2, 3, 1)))
            return y.permute(0, 3, 1, 2)

    torch.manual_seed(0)
    ok = ChannelsLast().eval()
    image = torch.randn(1, 3, 30, 26)
    assert torch.allclose(sstream.StreamingCNN(ok, 8)(image), ok(image), atol=1e-5)
    over_width = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(26))
    with pytest.raises(sstream.UnsupportedModuleError, match=r"'1' \(LayerNorm\).*spatial"):
        sstream.StreamingCNN(over_width, 8)
