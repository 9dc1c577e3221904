"""The engine announces every region it reads, so a slide read ahead is never waited for
on an unannounced region, and the numbers are those of reading on demand."""

from __future__ import annotations

import pytest
import torch

from sstream.data import PixelSource
from sstream.engine import StreamingCNN
from sstream.io import open_image, write_synthetic_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ahead") / "slide.tif"
    write_synthetic_slide(path, (300, 380), label=1, seed=2, tile=64)
    return path


def stream() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU()).double()


def run(slide, read_ahead: int, how: str, engine: str = "auto"):
    """(output, parameter gradients, the source) of one pass with `how`."""
    net = stream()
    scnn = StreamingCNN(net, 64, engine)
    source = PixelSource.from_slide(slide, 0, read_ahead=read_ahead)
    source.dtype = torch.float64
    if how == "pool":
        values, _ = scnn.global_pool(source, "max")
        values.sum().backward()
        out = values
    else:
        out = scnn(source)
        (out * out.detach().cos()).sum().backward()
    return out.detach(), [p.grad for p in net.parameters()], source


@pytest.mark.parametrize(("how", "engine"), [("pool", "auto"), ("map", "halo"),
                                             ("map", "crop")])
def test_every_read_is_announced_and_the_numbers_do_not_change(slide_path, how, engine):
    with open_image(slide_path) as slide:
        want, want_grads, _ = run(slide, 0, how, engine)
        got, got_grads, source = run(slide, 2, how, engine)
        assert torch.equal(got, want)
        for a, b in zip(got_grads, want_grads):
            assert torch.equal(a, b)
        assert source._ahead.misses == 0 and source._ahead.hits > 0
        source.close()


def test_a_masked_forward_announces_only_the_tiles_it_reads(slide_path):
    with open_image(slide_path) as slide:
        scnn = StreamingCNN(stream(), 64)
        source = PixelSource.from_slide(slide, 0, read_ahead=2)
        source.dtype = torch.float64
        out_h, out_w = scnn.output_size(source.shape)
        mask = torch.zeros(out_h, out_w, dtype=torch.bool)
        mask[: out_h // 4, : out_w // 4] = True  # one corner of tissue
        with torch.no_grad():
            scnn.global_pool(source, "max", mask=mask)
        all_tiles = len(scnn.plan(source.shape))
        assert source._ahead.misses == 0 and 0 < source._ahead.hits < all_tiles
