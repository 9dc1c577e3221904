"""What only a CUDA device can show; skipped without one (benchmarks/gpu_check.py runs them).

- regions handed out on the GPU (uint8 over the bus, floats made there) equal the CPU's;
- nvJPEG decodes a slide's tiles as the CPU decoders do, to the last bits JPEG leaves open;
- the engine, the pooled head and the read-ahead run on CUDA with plain autograd's numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sstream.data import Augmentation, PixelSource
from sstream.engine import StreamingCNN
from sstream.io import open_image, write_synthetic_slide
from tests.conftest import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "slide.tif"
    write_synthetic_slide(path, (700, 900), label=1, seed=4, tile=256)
    return path


def test_regions_on_the_gpu_equal_the_cpus(slide_path, monkeypatch):
    monkeypatch.setenv("SSTREAM_JPEG_DECODER", "cpu")  # the CPU decodes, the GPU converts
    with open_image(slide_path) as slide:
        cpu = PixelSource.from_slide(slide, 0, read_ahead=0)
        gpu = PixelSource.from_slide(slide, 0).to(CUDA)
        gpu.expect([(0, 300, 0, 400), (-10, 200, 700, 950)])
        for box in [(0, 300, 0, 400), (-10, 200, 700, 950)]:
            assert torch.equal(gpu.read(box).cpu(), cpu.read(box))


def test_nvjpeg_decodes_as_the_cpu_does(slide_path, monkeypatch):
    from sstream.gpu_decode import JpegRegionReader

    with open_image(slide_path) as slide:
        assert JpegRegionReader.supports(slide, 0)
        reader = JpegRegionReader(slide, 0, CUDA)
        for y0, y1, x0, x1 in [(0, 700, 0, 900), (13, 517, 255, 257), (-5, 40, 880, 920)]:
            gpu = reader(y0, y1, x0, x1).cpu().numpy().astype(int)
            cpu = slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).astype(int)
            assert gpu.shape == cpu.shape
            difference = np.abs(gpu - cpu)  # chroma upsampling differs at colour edges
            assert difference.mean() < 1 and np.percentile(difference, 99) <= 8
        source = PixelSource.from_slide(slide, 0).to(CUDA)
        assert source._device_read is not None  # nvJPEG by default on CUDA
        region = source.read((0, 256, 0, 256))
        assert region.device.type == "cuda" and region.shape == (1, 3, 256, 256)
        for flip, rotations in ((True, 1), (False, 3)):  # training's flips and rotations
            augmentation = Augmentation(flip=flip, rotations=rotations)
            on_gpu = source.augmented(augmentation, torch.float32)
            on_cpu = PixelSource.from_slide(slide, 0).augmented(augmentation, torch.float32)
            assert on_gpu._device_read is not None
            box = (30, 400, 100, 650)
            assert (on_gpu.read(box).cpu() - on_cpu.read(box)).abs().mean() < 1 / 255
        monkeypatch.setenv("SSTREAM_JPEG_DECODER", "cpu")
        assert PixelSource.from_slide(slide, 0).to(CUDA)._device_read is None


def test_engine_and_pooled_head_are_exact_on_cuda():
    torch.manual_seed(0)
    stream = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU()).to(CUDA, torch.float64)
    image = torch.rand(2, 3, 150, 170, dtype=torch.float64, device=CUDA)
    scnn = StreamingCNN(stream, 48)
    for run_streamed, run_plain in (
            (scnn, stream),
            (lambda x: scnn.global_pool(x, "max")[0],
             lambda x: torch.nn.functional.adaptive_max_pool2d(stream(x), 1).flatten(1))):
        grads = []
        for run in (run_streamed, run_plain):
            leaf = image.clone().requires_grad_(True)
            out = run(leaf)
            grads.append((out.detach(), *torch.autograd.grad(
                (out * out.detach().sin()).sum(), [leaf, *stream.parameters()])))
        for streamed, plain in zip(*grads):
            assert relative_error(streamed, plain) < 1e-9


def test_a_slide_streams_onto_the_gpu_with_read_ahead(slide_path, monkeypatch):
    monkeypatch.setenv("SSTREAM_JPEG_DECODER", "cpu")
    stream = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).to(CUDA)
    scnn = StreamingCNN(stream, 128)
    with open_image(slide_path) as slide:
        source = PixelSource.from_slide(slide, 0)
        expected = stream(PixelSource.from_slide(slide, 0).to_tensor().to(CUDA))
        with torch.no_grad():
            assert relative_error(scnn(source), expected) < 1e-6
        assert source.device.type == "cuda" and source._ahead.hits > 0
