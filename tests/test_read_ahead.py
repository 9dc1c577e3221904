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


def test_training_starts_reading_the_next_slide_while_the_current_one_trains(tmp_path,
                                                                              monkeypatch):
    """Lazily read slides: the loading thread announces the next image's first regions
    (the ones its pooled forward reads) once images of its shape have been planned (no
    flips or rotations here, so every image has one shape), and the weights are those of a
    run without read-ahead."""
    import threading

    import sstream.train as train_module
    import sstream.training.images
    from tests.conftest import float64_training
    from tests.test_train_predict import config

    monkeypatch.setattr(sstream.training.images, "IN_MEMORY_PIXELS", 0)  # every image read lazily
    announced = []
    expect = PixelSource.expect

    def recorded(self, boxes):
        announced.append((threading.current_thread() is threading.main_thread(),
                          list(boxes)))
        return expect(self, announced[-1][1])

    monkeypatch.setattr(PixelSource, "expect", recorded)
    with float64_training():
        ahead = train_module.train(config(tmp_path, epochs=1, out=str(tmp_path / "a"),
                                          tissue="none", augment="none"))
    early = [boxes for on_main, boxes in announced if not on_main]
    on_main = [boxes for main, boxes in announced if main]
    assert early and all(any(b[:len(boxes)] == boxes for b in on_main) for boxes in early)
    monkeypatch.setattr(PixelSource, "expect", lambda self, boxes: None)  # no read-ahead
    with float64_training():
        plain = train_module.train(config(tmp_path, epochs=1, out=str(tmp_path / "b"),
                                          tissue="none", augment="none"))
    for name, value in plain.model.state_dict().items():
        assert torch.equal(ahead.model.state_dict()[name], value), name


def test_training_reads_ahead_into_slides_of_shapes_not_planned_yet(tmp_path, monkeypatch):
    """Whole images, each of its own shape: the loading thread cannot plan them, so the
    training thread plans the next one between the current image's forward and backward and
    announces its reads then; the image's own forward then reads exactly those regions, and
    the weights are those of a run without read-ahead."""
    import csv
    import threading

    import numpy as np
    from PIL import Image

    import sstream.train as train_module
    import sstream.training.images
    from tests.conftest import float64_training
    from tests.test_train_predict import config

    rng = np.random.default_rng(5)
    rows = []
    for index, size in enumerate([(72, 88), (88, 64), (64, 96), (80, 80)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            tmp_path / f"{index}.png")
        rows.append((f"{index}.png", index % 2))
    with open(tmp_path / "shapes.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "label"), *rows])
    monkeypatch.setattr(sstream.training.images, "IN_MEMORY_PIXELS", 0)  # read lazily
    announced: dict[int, list] = {}
    sources = []  # kept alive, so that no two sources share an id
    expect = PixelSource.expect

    def recorded(self, boxes):
        assert threading.current_thread() is threading.main_thread()  # no shape planned
        sources.append(self)
        announced.setdefault(id(self), []).append(list(boxes))
        return expect(self, announced[id(self)][-1])

    monkeypatch.setattr(PixelSource, "expect", recorded)
    settings = dict(train_csv=str(tmp_path / "shapes.csv"), epochs=1, tissue="none",
                    augment="none", accumulate=1)
    with float64_training():
        ahead = train_module.train(config(tmp_path, out=str(tmp_path / "a"), **settings))
    # each image: its forward's reads, then its backward's; every image after the first:
    # its forward's reads announced once more beforehand, during the step before it
    counts = [len(calls) for calls in announced.values()]
    assert counts == [2, 3, 3, 3], counts
    early = list(announced.values())[1:]
    assert all(calls[0] == calls[1] for calls in early)  # the forward reads what was announced
    monkeypatch.setattr(PixelSource, "expect", lambda self, boxes: None)  # no read-ahead
    with float64_training():
        plain = train_module.train(config(tmp_path, out=str(tmp_path / "b"), **settings))
    for name, value in plain.model.state_dict().items():
        assert torch.equal(ahead.model.state_dict()[name], value), name
