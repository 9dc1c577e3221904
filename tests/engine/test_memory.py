"""The meta-device memory estimate: its instruments, its phases, and measurement.

The accuracy test runs real training steps (ResNet-18, float32, AdamW, CPU) in subprocesses
and compares the predicted peak with the measured one: the peak resident set size
(`ru_maxrss`) above a baseline taken after torch's kernels were warmed up, with glibc told to
return every allocation above 64 KiB to the system at once (MALLOC_MMAP_THRESHOLD_), so that
RSS follows live tensor memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from sstream import StreamingCNN
from sstream.engine.geometry import meta_shortcut
from sstream.engine.memory import (
    LiveBytes,
    MemoryEstimate,
    estimate_training_memory,
    largest_fitting_row,
)
from sstream.engine.streaming import TensorSource


def _small_model() -> tuple[nn.Module, nn.Module]:
    stream = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                           nn.MaxPool2d(2))
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    return stream, head


def test_live_bytes_counts_storages_once_and_forgets_freed_ones():
    x = torch.empty(1000, device="meta")
    with LiveBytes([x]) as live:
        a = x * 2  # 4000 bytes
        view = a[:10]  # a view: no new storage
        a.mul_(3)  # in place: no new storage
        b = torch.empty(500, dtype=torch.float64, device="meta")  # 4000 bytes
        assert live.current == 8000
        del a, b
        assert live.current == 4000  # the view keeps a's storage alive
        del view
        assert live.current == 0
    assert live.peak == 8000


def test_estimate_rows_and_components():
    stream, head = _small_model()
    estimate = estimate_training_memory(stream, head, (256, 192), [32, 64], optimizer="sgd",
                                        engine="crop", whole_slide=False)
    assert isinstance(estimate, MemoryEstimate)
    assert [r.mode for r in estimate.rows] == ["conventional", "streaming", "streaming"]
    assert [r.engine for r in estimate.rows] == [None, "crop", "crop"]
    assert [r.path for r in estimate.rows] == [None, "feature map", "feature map"]
    assert [r.tile_size for r in estimate.rows] == [None, (32, 32), (64, 64)]
    params = sum(p.numel() for p in [*stream.parameters(), *head.parameters()]) * 4
    conventional, small, large = estimate.rows
    assert conventional.parameters_bytes == params and conventional.optimizer_bytes == params
    assert estimate.feature_map_shape == (1, 16, 64, 48)
    assert small.feature_map_bytes == 2 * 16 * 64 * 48 * 4
    assert small.num_tiles == 8 * 6 and large.num_tiles == 4 * 3
    assert small.peak_bytes < large.peak_bytes < conventional.peak_bytes
    assert small.compute_overhead > large.compute_overhead > 1
    # the first conv alone saves its 3-channel input and its 8-channel output for backward
    assert conventional.activations_bytes > 8 * 256 * 192 * 4
    assert stream.training and head.training, "the modules' modes are restored"
    assert largest_fitting_row(estimate, large.peak_bytes) is large
    assert largest_fitting_row(estimate, small.peak_bytes) is small
    assert largest_fitting_row(estimate, small.peak_bytes - 1) is None


class _ReadCopies(TensorSource):
    """Each read a new tensor, as when a slide is read lazily (the estimate assumes so)."""

    def read(self, box: tuple[int, int, int, int]) -> torch.Tensor:
        return super().read(box).clone()


@pytest.mark.parametrize("size, tile, high", [
    ((256, 192), 64, 1.01),   # 4 x 3 tiles: the whole step is traced
    ((480, 352), 32, 1.25),   # 15 x 11 tiles: traced on 4 x 4, the growth added
])
def test_halo_estimate_against_a_measured_step(size, tile, high):
    """The halo row's step peak (above parameters and optimizer state) against the live
    bytes of the same step run on the CPU: equal when the whole grid is traced, a little
    above (never below) when the trace runs on a proxy grid of PROXY_TILES per axis."""
    stream, head = _small_model()
    (_, row) = estimate_training_memory(stream, head, size, [tile], optimizer="sgd",
                                        whole_slide=False).rows
    assert row.engine == "halo" and row.largest_crop is None
    predicted = row.peak_bytes - row.parameters_bytes - row.optimizer_bytes
    stream.eval()
    image = torch.rand(1, 3, *size)
    scnn = StreamingCNN(stream, tile)
    scnn.engine_for(image.shape)  # planned before the step, as in training
    with LiveBytes([image, *stream.parameters(), *stream.buffers(),
                    *head.parameters()]) as live:
        nn.functional.cross_entropy(head(scnn(_ReadCopies(image))),
                                    torch.tensor([1])).backward()
    assert live.peak <= predicted <= high * live.peak, (predicted, live.peak)


@pytest.mark.parametrize("pooling, size, tile", [("avg", (480, 352), 32),
                                                  ("max", (480, 352), 32),
                                                  ("avg", (256, 192), 64)])
def test_whole_slide_estimate_against_a_measured_step(pooling, size, tile):
    """A pooling head is estimated on the whole-slide path (its row says so, with no feature
    map): within 15% of the live bytes of the same step with average pooling, whose backward
    re-runs the tile plan's crops; an upper bound with max pooling, whose backward may pick
    smaller blocks for the few positions holding a maximum."""
    stream, head = _small_model()
    head[0] = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else head[0]
    (_, row) = estimate_training_memory(stream, head, size, [tile], optimizer="sgd").rows
    assert (row.path, row.engine, row.feature_map_bytes) == ("whole-slide", "halo", 0)
    (_, feature_map) = estimate_training_memory(stream, head, size, [tile], optimizer="sgd",
                                                whole_slide=False).rows
    assert feature_map.path == "feature map" and feature_map.feature_map_bytes > 0
    predicted = row.peak_bytes - row.parameters_bytes - row.optimizer_bytes
    stream.eval()
    image = torch.rand(1, 3, *size)
    scnn = StreamingCNN(stream, tile)
    scnn.halo_program(image.shape, training=False)  # planned before the step
    with LiveBytes([image, *stream.parameters(), *stream.buffers(),
                    *head.parameters()]) as live:
        pooled, _ = scnn.global_pool(_ReadCopies(image), pooling)
        nn.functional.cross_entropy(head[1:](pooled[..., None, None]),
                                    torch.tensor([1])).backward()
    assert live.peak <= predicted * 1.15, (predicted, live.peak)
    if pooling == "avg":
        assert predicted <= 1.15 * live.peak, (predicted, live.peak)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_shortcuts_make_what_the_meta_kernels_make(memory_format, dtype):
    """Planning and the estimate skip slow meta kernels: what they make instead has the
    shapes, strides and dtypes the kernels give (the live bytes and every later op see
    them)."""
    aten = torch.ops.aten
    x = torch.empty(2, 8, 5, 7, device="meta", dtype=dtype).to(memory_format=memory_format)
    w = torch.empty(8, device="meta")
    calls = [(aten.relu.default, (x,)), (aten.add.Tensor, (x, x)),
             (aten.threshold_backward.default, (x, x, 0.0)),
             (aten._native_batch_norm_legit_no_training.default, (x, w, w, w, w, 0.1, 1e-5)),
             (aten.native_batch_norm_backward.default,
              (x, x, w, w, w, w, w, False, 1e-5, [True, True, True]))]
    for func, args in calls:
        expected, got = func(*args), meta_shortcut(func, args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        assert [(t.shape, t.stride(), t.dtype) for t in got] == \
            [(t.shape, t.stride(), t.dtype) for t in expected], func


def test_memory_grows_with_dtype_optimizer_and_batch():
    stream, head = _small_model()

    def peak(**kwargs) -> int:
        return estimate_training_memory(stream, head, (128, 128), **kwargs).rows[0].peak_bytes

    assert peak(dtype="float16") < peak(dtype="float32")
    assert peak(optimizer="sgd") < peak(optimizer="adamw")
    assert peak(batch=2) > peak(batch=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "lbfgs"}, "unknown optimizer"),
    ({"dtype": "int8"}, "unknown dtype"),
    ({"tile_sizes": [512]}, "larger than the image"),
    ({"image_size": (0, 64)}, "positive"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    stream, head = _small_model()
    arguments = {"image_size": (256, 256), **kwargs}
    with pytest.raises(ValueError, match=message):
        estimate_training_memory(stream, head, **arguments)


def test_gigapixel_estimate_takes_seconds():
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    stream = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
    head = nn.Sequential(net.layer3, net.layer4, nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(512, 2))
    start = time.monotonic()
    estimate = estimate_training_memory(stream, head, (65536, 65536), [4096])
    assert time.monotonic() - start < 20
    conventional, streaming = estimate.rows
    assert conventional.peak_bytes > 1000 * 2**30  # a terabyte and more
    assert streaming.saving > 0.5


# ---- against measurement ------------------------------------------------------------------

# (image side, tile (0: conventional), stream_layers, pooling): the whole trunk streamed with
# large crops (its receptive field is 435 px), a split after layer2 with many small crops
# (the feature-map path, crop engine), and the whole trunk on the whole-slide path (a pooling
# head; average pooling, whose backward re-runs every crop, as the estimate models).
CASES = [(768, 0, None, None), (1024, 512, None, None), (1024, 256, "layer2", None),
         (1024, 256, None, "avg")]

_MEASURE = textwrap.dedent("""
    import gc, json, os, sys
    import torch
    import torch.nn.functional as F
    from sstream import StreamingCNN
    from sstream.models import ModelConfig, build_model, freeze_batchnorm, streamed_logits

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def step(side, tile, split, pooling):
        # A streaming run reads its image lazily (crops are views here): not counted.
        image = torch.rand(1, 3, side, side) if tile else None
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS (VmHWM) := current RSS
        baseline = status("VmRSS")
        torch.manual_seed(0)
        model = build_model(ModelConfig("resnet18", stream_layers=split,
                                        pooling=pooling or "max"))
        freeze_batchnorm(model, train_affine=True)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters())
        for p in model.parameters():  # steady state: optimizer state exists, grads are None
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not tile:
            image = torch.rand(1, 3, side, side)
            logits = model(image)
        elif pooling:  # the whole-slide path, as training takes it
            logits = streamed_logits(model, StreamingCNN(model.stream, tile), image)
        else:
            scnn = StreamingCNN(model.stream, tile, engine="crop")  # as the estimate models
            logits = model.head(scnn(image))
        F.cross_entropy(logits, torch.tensor([1])).backward()
        optimizer.step()
        return status("VmHWM") - baseline

    warm = build_model(ModelConfig("resnet18"))  # first-call allocations of the kernels
    F.cross_entropy(warm(torch.rand(1, 3, 64, 64)), torch.tensor([1])).backward()
    del warm
    cases = json.loads(sys.argv[1])
    print(json.dumps([step(*case) for case in cases]))
""")


def measure_peaks(cases: list[tuple[int, int, str | None, str | None]]) -> list[int]:
    """Measured peak bytes of one ResNet-18 training step per (side, tile, stream_layers,
    pooling), tile 0 meaning conventional, pooling None the feature-map path (max pooling);
    one subprocess, the peak reset between cases."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict_peak(side: int, tile: int, split: str | None, pooling: str | None) -> int:
    from sstream.models import ModelConfig, build_model

    model = build_model(ModelConfig("resnet18", stream_layers=split, pooling=pooling or "max"))
    estimate = estimate_training_memory(model.stream, model.head, (side, side),
                                        [tile] if tile else [],
                                        engine="auto" if pooling else "crop",
                                        whole_slide=pooling is not None)
    return estimate.rows[-1].peak_bytes


@pytest.fixture(scope="module")
def measured() -> dict[tuple[int, int, str | None, str | None], int]:
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    return dict(zip(CASES, measure_peaks(CASES)))


@pytest.mark.slow
@pytest.mark.parametrize("side, tile, split, pooling", CASES)
def test_prediction_within_15_percent_of_measured_peak(measured, side, tile, split, pooling):
    actual = measured[(side, tile, split, pooling)]
    predicted = predict_peak(side, tile, split, pooling)
    assert abs(predicted - actual) <= 0.15 * actual, (
        f"resnet18 {side}px tile {tile or 'conventional'} split {split} {pooling}: predicted "
        f"{predicted / 2**20:.0f} MiB, measured {actual / 2**20:.0f} MiB")
