"""The training job's pieces (sstream.training): the one resume check, and the state an
epoch's end moves on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sstream.train import TrainConfig, train
from sstream.training.checkpoint import ResumeMismatch, TrainState, check_resume
from tests.test_train_predict import config


def test_resume_check_keeps_resumable_changes_and_names_each_other_difference(tmp_path):
    """Options a resume may change come back as changes; paths written another way are
    the same path; a list equals the saved tuple; anything else is refused, each option
    with its saved and given value."""
    saved = TrainConfig(train_csv=str(tmp_path / "train.csv"), out=str(tmp_path / "run"),
                        image_size=(64, 48), epochs=2)
    same_csv = str(tmp_path / "x" / ".." / "train.csv")
    changes = check_resume(saved, {"epochs": 5, "device": "cpu", "train_csv": same_csv,
                                   "image_size": [64, 48], "out": saved.out}, saved.out)
    assert changes == {"epochs": 5, "device": "cpu"}
    with pytest.raises(ResumeMismatch) as refused:
        check_resume(saved, {"lr": 0.5, "epochs": 9, "level": 1, "out": str(tmp_path)},
                     saved.out)
    message = str(refused.value)
    assert "--lr was 0.001, now 0.5; --level was not set, now 1; --out was" in message
    assert "--epochs was" not in message
    assert message.endswith("(only --epochs, --device, --accumulate, --dist-timeout, "
                            "--patience, --min-epochs and --log may change)")


def test_a_library_resume_with_other_settings_is_refused_by_the_same_check(tmp_path):
    """train(resume=True) with a changed option stops before any step, naming it as
    `resume_config` does, and last.pt is untouched."""
    settings = config(tmp_path, epochs=1, accumulate=1)
    train(settings)
    last = Path(settings.out) / "last.pt"
    before = last.read_bytes()
    changed = TrainConfig(**{**settings.__dict__, "epochs": 2, "seed": 4})
    with pytest.raises(ResumeMismatch, match="--seed was 3, now 4"):
        train(changed, resume=True)
    assert last.read_bytes() == before


def test_epoch_end_records_the_row_and_counts_epochs_without_a_better_score():
    state = TrainState(epoch=0, image_index=3, step=5, epoch_loss_sum=2.0, epoch_tiles=7)
    assert state.end_epoch({"epoch": 1}, [0.5, 0.0, 0.0])
    assert (state.epoch, state.image_index, state.step) == (1, 0, 5)
    assert (state.epoch_loss_sum, state.epoch_tiles, state.epochs_since_best) == (0.0, 0, 0)
    assert not state.end_epoch({"epoch": 2}, [0.5, 0.0, 0.0])  # equal is not better
    assert not state.end_epoch({"epoch": 3}, [0.4, 9.0, 9.0])
    assert state.epochs_since_best == 2 and state.best_score == [0.5, 0.0, 0.0]
    assert [row["epoch"] for row in state.history] == [1, 2, 3]
    assert TrainState().best_score == [-math.inf] * 3
