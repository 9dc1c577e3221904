"""The model zoo: building, splitting, streaming, weights files and checkpoints.

How the pieces are meant to be used (the training loop does the same):

    model = build_model(ModelConfig("resnet18", num_classes=2, stream_layers="layer2"))
    freeze_batchnorm(model.stream, train_affine=True)   # tiles cannot see image statistics
    scnn = StreamingCNN(model.stream, tile_size=512)
    logits = model.head(scnn(image))                    # == model(image), exactly
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torchvision

from sstream import StreamingCNN
from sstream.models import (
    CHECKPOINT_FORMAT,
    MODEL_NAMES,
    Classifier,
    ModelConfig,
    Normalize,
    build_model,
    checkpoint_payload,
    freeze_batchnorm,
    load_checkpoint,
    minimum_input_size,
    split_names,
)
from tests.conftest import relative_error
from tests.engine.helpers import randomise_batchnorm

# (config, image side, tile side, dtype, tolerance): small images so that every model is fast
# on CPU; the split is chosen so that the tile is smaller than the image (real tiling).
STREAMING_CASES = [
    (ModelConfig("tiny"), 200, 48, torch.float64, 1e-10),
    (ModelConfig("resnet18", stream_layers="layer1"), 160, 64, torch.float64, 1e-10),
    (ModelConfig("resnet34", stream_layers="layer1"), 128, 64, torch.float64, 1e-10),
    (ModelConfig("resnet50", stream_layers="layer1", pooling="avg"), 96, 32, torch.float32,
     1e-4),
    (ModelConfig("convnext_tiny", stream_layers="stage1"), 96, 32, torch.float32, 1e-4),
    (ModelConfig("vgg16", stream_layers="block2"), 72, 24, torch.float32, 1e-4),
]


def test_every_model_name_has_a_streaming_case():
    assert {case[0].name for case in STREAMING_CASES} == set(MODEL_NAMES)


@pytest.mark.parametrize("config, side, tile, dtype, tolerance", STREAMING_CASES,
                         ids=[case[0].name for case in STREAMING_CASES])
def test_streamed_stream_plus_head_equals_the_whole_model(config, side, tile, dtype, tolerance):
    torch.manual_seed(0)
    model = build_model(config).to(dtype).eval()
    randomise_batchnorm(model)
    image = torch.rand(1, 3, side, side + 8, dtype=dtype)
    scnn = StreamingCNN(model.stream, tile)
    assert len(scnn.plan(image.shape)) > 1, "the case must really tile"
    with torch.no_grad():
        expected = model(image)
        streamed = model.head(scnn(image))
    assert expected.shape == (1, config.num_classes)
    assert relative_error(streamed, expected) < tolerance


def test_streamed_training_step_gives_the_whole_model_gradients():
    torch.manual_seed(0)
    model = build_model(ModelConfig("tiny", stream_layers="stage3", dropout=0.0)).double()
    randomise_batchnorm(model)
    freeze_batchnorm(model.stream, train_affine=True)
    model.train()
    image = torch.rand(2, 3, 96, 80, dtype=torch.float64)
    target = torch.tensor([0, 1])

    def grads(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits, target).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads(model(image))
    actual = grads(model.head(StreamingCNN(model.stream, 32)(image)))
    assert actual.keys() == expected.keys()
    assert any(n.startswith("stream.") for n in actual) and any(n.startswith("head.")
                                                                for n in actual)
    for name, grad in expected.items():
        assert relative_error(actual[name], grad) < 1e-10, name


def test_stream_starts_with_normalize_and_head_ends_with_the_classifier():
    model = build_model(ModelConfig("resnet18", num_classes=5, pooling="avg", dropout=0.3))
    assert isinstance(model, Classifier)
    assert isinstance(model.stream[0], Normalize)
    assert isinstance(model.head.pool, torch.nn.AdaptiveAvgPool2d)
    assert model.head.dropout.p == 0.3
    assert model.head.fc.out_features == 5
    image = torch.rand(1, 3, 64, 64)
    expected = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model.stream.normalize(image), expected)


@pytest.mark.parametrize("name, strides", [
    ("tiny", (2, 4, 8, 16)),
    ("resnet18", (4, 8, 16, 32)),
    ("vgg16", (2, 4, 8, 16, 32)),
])
def test_split_points_move_stages_from_head_to_stream(name, strides):
    sizes = []
    for split, stride in zip(split_names(name), strides):
        model = build_model(ModelConfig(name, stream_layers=split))
        assert StreamingCNN(model.stream, 64).geometry.stride == (stride, stride)
        assert split in dict(model.stream.named_children())
        assert split not in dict(model.head.named_children())
        sizes.append((sum(p.numel() for p in model.stream.parameters()),
                      sum(p.numel() for p in model.parameters())))
    stream_sizes = [s for s, _ in sizes]
    assert stream_sizes == sorted(stream_sizes) and len(set(stream_sizes)) == len(strides)
    assert len({total for _, total in sizes}) == 1, "splitting must not change the model"
    whole = build_model(ModelConfig(name, stream_layers=None))
    assert list(dict(whole.head.named_children())) == ["pool", "flatten", "dropout", "fc"]


def test_convnext_stage_names_cover_the_whole_trunk():
    model = build_model(ModelConfig("convnext_tiny", stream_layers="stage2"))
    assert list(dict(model.stream.named_children())) == ["normalize", "stem", "stage1", "stage2"]
    assert list(dict(model.head.named_children())) == [
        "stage3", "stage4", "pool", "flatten", "norm", "dropout", "fc"]


def test_unknown_model_and_split_point_list_the_valid_ones():
    with pytest.raises(ValueError, match="resnet34.*convnext_tiny"):
        build_model(ModelConfig("resnet19"))
    with pytest.raises(ValueError, match="layer1, layer2, layer3, layer4"):
        build_model(ModelConfig("resnet18", stream_layers="stage2"))
    with pytest.raises(ValueError, match="pooling"):
        build_model(ModelConfig("tiny", pooling="median"))


def test_model_config_round_trips_through_a_dict():
    config = ModelConfig("vgg16", num_classes=3, stream_layers="block3", pooling="avg",
                         dropout=0.5)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "depth": 3})


def test_frozen_batchnorm_stays_in_eval_mode_through_train():
    model = build_model(ModelConfig("tiny", stream_layers="stage2"))
    freeze_batchnorm(model.stream, train_affine=False)
    model.train()
    stream_bns = [m for m in model.stream.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    head_bns = [m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert stream_bns and head_bns
    assert not any(bn.training for bn in stream_bns)
    assert all(bn.training for bn in head_bns)  # the head sees the whole feature map
    assert not any(bn.weight.requires_grad or bn.bias.requires_grad for bn in stream_bns)
    StreamingCNN(model.stream, 32)(torch.rand(1, 3, 64, 64))  # accepted in train mode
    freeze_batchnorm(model, train_affine=True)
    model.train()
    assert all(not bn.training and bn.weight.requires_grad for bn in stream_bns + head_bns)
    model.eval()
    assert not model.training


def test_minimum_input_size():
    assert minimum_input_size(build_model(ModelConfig("tiny"))) == 16
    assert minimum_input_size(build_model(ModelConfig("vgg16", stream_layers="block1"))) == 32


# ---- weights files ----------------------------------------------------------------------


def test_torchvision_weights_file_loads_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig("resnet18", num_classes=2, stream_layers="layer2"),
                        weights=path)
    assert torch.equal(model.stream.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.stream.layer2[1].bn2.running_var, reference.layer2[1].bn2.running_var)
    assert torch.equal(model.head.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)
    assert model.head.fc.out_features == 2  # fc.* of the file was ignored


def test_convnext_weights_file_loads_its_norm_into_the_head(tmp_path):
    reference = torchvision.models.convnext_tiny(weights=None)
    with torch.no_grad():
        reference.classifier[0].weight.uniform_()
    path = tmp_path / "convnext.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig("convnext_tiny"), weights=path)
    assert torch.equal(model.head.norm.weight, reference.classifier[0].weight)
    assert torch.equal(model.stream.stage4.blocks[0].layer_scale,
                       reference.features[7][0].layer_scale)


@pytest.mark.parametrize("other, pattern", [
    ("resnet34", "unexpected keys: .*layer1.2"),
    ("resnet50", "unexpected keys|shape mismatches"),
])
def test_weights_of_another_architecture_raise(tmp_path, other, pattern):
    path = tmp_path / f"{other}.pth"
    torch.save(getattr(torchvision.models, other)(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=f"{other}.pth.*do not fit resnet18.*({pattern})"):
        build_model(ModelConfig("resnet18"), weights=path)


def test_weights_of_a_smaller_architecture_report_missing_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit resnet34.*missing keys: layer1.2"):
        build_model(ModelConfig("resnet34"), weights=path)


def test_vgg16_loads_a_full_torchvision_vgg16_file(tmp_path):
    with torch.device("meta"):  # key names and shapes of the real thing, without 138M params
        names = torchvision.models.vgg16(weights=None).state_dict()
    torch.manual_seed(3)
    state = {k: torch.randn(v.shape) for k, v in names.items() if k.startswith("features.")}
    state |= {k: torch.zeros(1) for k in names if k.startswith("classifier.")}  # ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = build_model(ModelConfig("vgg16", stream_layers="block2"), weights=path)
    assert torch.equal(model.stream.block2[0].weight, state["features.5.weight"])
    assert torch.equal(model.head.block5[2].bias, state["features.26.bias"])


def test_weights_file_that_is_not_a_state_dict_raises(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.pth"):
        build_model(ModelConfig("resnet18"), weights=path)


def test_pretrained_offline_fails_fast_and_suggests_weights(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty cache: nothing to fall back on
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="--weights PATH"):
            build_model(ModelConfig("resnet18"), pretrained=True)
        assert time.monotonic() - start < 10
    finally:
        torch.hub.set_dir(previous)


# ---- checkpoints ------------------------------------------------------------------------


def _trained_like_model() -> Classifier:
    torch.manual_seed(2)
    model = build_model(ModelConfig("tiny", num_classes=3, stream_layers="stage2",
                                    pooling="avg"))
    randomise_batchnorm(model)
    return model.eval()


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = _trained_like_model()
    path = tmp_path / "model.pt"
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({**checkpoint_payload(model), "optimizer": optimizer.state_dict(), "epoch": 4},
               path)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    image = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))
    assert checkpoint_payload(model)["format"] == CHECKPOINT_FORMAT


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "no_model", "misfit"])
def test_bad_checkpoint_raises_value_error_naming_the_file(tmp_path, damage):
    path = tmp_path / f"{damage}-ckpt.pt"
    payload = checkpoint_payload(_trained_like_model())
    if damage == "garbage":
        path.write_bytes(b"\x00\x01not a torch file" * 10)
    elif damage == "truncated":
        torch.save(payload, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"state_dict": payload["model"]}, path)
    elif damage == "no_model":
        torch.save({k: v for k, v in payload.items() if k != "model"}, path)
    else:
        payload["model_config"]["name"] = "resnet18"
        torch.save(payload, path)
    with pytest.raises(ValueError, match=f"{damage}-ckpt.pt"):
        load_checkpoint(path)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.parametrize("content, message", [
    ("text", "not a readable checkpoint .*use a last.pt or best.pt"),
    ("state dict", "a plain state dict .*sstream train --weights"),
    ("lightning", "a PyTorch Lightning checkpoint, not an sstream checkpoint"),
    ("list", "a pickled list, not an sstream checkpoint"),
])
def test_what_a_file_that_is_not_a_checkpoint_is_in_one_line(tmp_path, content, message):
    path = tmp_path / "notes.pt"
    model = build_model(ModelConfig("tiny"))
    if content == "text":
        path.write_text("my notes about the run\n")
    else:
        torch.save({"state dict": model.state_dict(),
                    "lightning": {"state_dict": model.state_dict(),
                                  "pytorch-lightning_version": "2.4.0"},
                    "list": [1, 2, 3]}[content], path)
    with pytest.raises(ValueError, match=message) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_a_sealed_checkpoint_with_a_changed_byte_is_refused(tmp_path):
    """torch files carry no checksum: a changed byte in a tensor would load silently. The
    digest written at save refuses it; the same file untouched loads."""
    from sstream.models import seal

    model = build_model(ModelConfig("tiny")).eval()
    with torch.no_grad():
        model.head.fc.weight.fill_(0.25)  # a pattern to find in the file's bytes
    path = tmp_path / "last.pt"
    torch.save(seal(checkpoint_payload(model)), path)
    assert torch.equal(load_checkpoint(path).head.fc.weight, model.head.fc.weight)
    data = bytearray(path.read_bytes())
    pattern = torch.full((4,), 0.25).numpy().tobytes()
    position = bytes(data).index(pattern)
    data[position] ^= 0x01  # 0.25 -> 0.25000003: a plausible weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: its contents do not match the checksum"):
        load_checkpoint(path)
