"""Attention pooling in the jobs: training (--pooling attention) on the whole-slide path with
tissue masks, equal to the feature-map path and to the plain model; verify and the memory
estimate take it too."""

from __future__ import annotations

import torch

from sstream.engine import StreamingCNN
from sstream.models import ModelConfig, build_model, streamed_logits, training_path
from sstream.train import TrainConfig, train
from tests.conftest import float64_training, relative_error
from tests.test_train_predict import assert_both_paths_train_alike


def test_attention_pooling_trains_on_the_whole_slide_path_as_on_the_feature_map(tmp_path):
    """Two SGD steps (four images, accumulate 2, augmentation and dropout on): the
    whole-slide path's weights equal the feature-map path's, float64."""
    runs = assert_both_paths_train_alike(tmp_path, pooling="attention", attention_hidden=8)
    assert any(name.startswith("head.pool.attention") for name in runs["feature map"])


def test_a_masked_attention_model_streams_as_the_plain_model():
    """Classifier.forward(x, mask) (softmax over the mask on the whole feature map) equals
    `streamed_logits` with the mask, logits and every gradient, float64."""
    with float64_training():
        torch.manual_seed(0)
        model = build_model(ModelConfig("tiny", 3, pooling="attention", attention_hidden=6))
        model.eval()
        image = torch.rand(1, 3, 96, 80)
        scnn = StreamingCNN(model.stream, 32)
        mask = torch.rand(scnn.output_size(image.shape)) < 0.6
        mask[0, 0] = True
        grads = []
        for run in (lambda: model(image, mask), lambda: streamed_logits(model, scnn, image, mask)):
            model.zero_grad(set_to_none=True)
            logits = run()
            (logits * torch.arange(3.0)).sum().backward()
            grads.append((logits.detach(), {n: p.grad.clone() for n, p in
                                            model.named_parameters()}))
    assert training_path(model) == "whole-slide"
    (plain, plain_grads), (streamed, streamed_grads) = grads
    assert relative_error(streamed, plain) < 1e-9
    for name, grad in plain_grads.items():
        assert relative_error(streamed_grads[name], grad) < 1e-9, name


def test_an_attention_run_resumes_and_runs_on_two_ranks_as_in_one_process(tmp_path):
    """Two ranks x accumulate 1 equal one process x accumulate 2 (spawned ranks, gloo), and
    a run stopped after three images and resumed ends with the uninterrupted run's
    weights; float64 throughout."""
    from tests.test_distributed import join_ranks, relative_errors, start_ranks
    from tests.test_train_predict import write_dataset

    common = dict(train_csv=str(write_dataset(tmp_path, 4, size=(40, 48))), tile_size=32,
                  device="cpu", lr=1e-2, seed=5, pooling="attention", attention_hidden=4)
    ranks = start_ranks(2, "train", {"config": {**common, "epochs": 2,
                                                "out": str(tmp_path / "two"),
                                                "accumulate": 1}}, tmp_path)
    with float64_training():
        single = train(TrainConfig(**common, epochs=2, out=str(tmp_path / "one"),
                                   accumulate=2))
        polls = {"count": 0}

        def stop_after_three_images() -> bool:
            polls["count"] += 1
            return polls["count"] == 3  # mid-epoch, mid-group

        resumable = TrainConfig(**common, epochs=2, out=str(tmp_path / "resumed"),
                                accumulate=2)
        assert train(resumable, should_stop=stop_after_three_images).interrupted
        resumed = train(resumable, resume=True)
    rank0, _ = join_ranks(ranks)
    expected = single.model.state_dict()
    assert any(name.startswith("head.pool.attention") for name in expected)
    assert relative_errors(rank0["model"], expected) < 1e-10
    assert relative_errors(resumed.model.state_dict(), expected) < 1e-10
