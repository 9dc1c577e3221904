"""Validation: the streamed forward over the validation set, each rank predicting its shard,
the task's metrics computed from everyone's predictions in the CSV's order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sstream.data import Sample
from sstream.distributed import DataParallel
from sstream.models import model_outputs
from sstream.training import images
from sstream.training.reporting import TrainEvents
from sstream.training.setup import TrainingParts


@dataclass
class Validation:
    """The validation set's predictions (in the CSV's order), labels and metrics."""

    predictions: np.ndarray
    labels: list[Any]
    metrics: dict[str, float]


def validate(parts: TrainingParts, parallel: DataParallel, events: TrainEvents
             ) -> Validation:
    """Predict the validation images (model in eval mode; back to train mode after) and
    score them with the task's metrics and loss."""
    parts.model.eval()
    mine = parallel.shard(0, len(parts.val_samples))
    predicted = []  # (position in the CSV, prediction, label)
    with parallel.agreement("during validation"):
        for done, index in enumerate(mine, start=1):
            sample = parts.val_samples[index]
            predicted.append((index, _prediction(parts, sample), sample.label))
            events.on_validation(done, len(mine))
    parts.model.train()
    gathered = parallel.gather_objects(predicted, "gathering validation results")
    merged = sorted((row for rows in gathered for row in rows), key=lambda row: row[0])
    predictions, labels = np.stack([row[1] for row in merged]), [row[2] for row in merged]
    return Validation(predictions, labels, parts.task.metrics(predictions, labels))


def _prediction(parts: TrainingParts, sample: Sample) -> np.ndarray:
    """One validation image's prediction (centre crop, no augmentation)."""
    config, scnn = parts.config, parts.scnn
    source = images.load_training_image(sample, config, False, (), parts.dtype,
                                        parts.tissue)
    try:
        outputs = model_outputs(parts.model, scnn, source, config.amp, parts.amp_dtype,
                                images.sample_output_mask(source, scnn, sample))
    finally:
        source.close()
    return parts.task.predictions(outputs)
