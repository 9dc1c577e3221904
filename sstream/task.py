"""What a model predicts: classes or continuous values, as one object every job shares.

A task knows how to read labels from a CSV, the loss, what a prediction is (probabilities
or values in the label's units), the validation metrics and which one picks `best.pt`, the
columns of a predictions CSV, and what saliency explains. Train, predict and saliency ask
it instead of branching on the kind of label:

- `Classification`: integer labels or class names (`tumor`, `normal`: indexed in sorted
  order, the names recorded in the model's config) in a `label` column, cross-entropy, softmax
  probabilities, accuracy, balanced accuracy, AUC, macro F1 and (two classes) sensitivity
  and specificity (best: AUC).
- `Regression`: float labels in a `label` column, or several targets in `label_<name>`
  columns; MSE, L1 or Huber loss on standardised targets (the training labels' mean and
  standard deviation, kept in the model's `TargetScale`, so the model itself answers in
  the label's units); Spearman, Pearson, MAE and RMSE (best: Spearman).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from sstream.errors import InputError
from sstream.metrics import (
    bootstrap_auc,
    classification_metric_names,
    classification_metrics,
    confusion,
    patient_level,
    regression_metrics,
    roc_curves,
)
from sstream.plots import Panel, Series, confusion_plot, line_plot

TASKS = ("classification", "regression")
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


class TargetScale(nn.Module):
    """The regression head's last layer: standardised outputs -> the label's units
    (`x * std + mean`, per target). Its buffers travel in checkpoints."""

    def __init__(self, targets: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(targets))
        self.register_buffer("std", torch.ones(targets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)

    def standardise(self, values: torch.Tensor) -> torch.Tensor:
        """Values in the label's units -> standardised units (where the loss is taken)."""
        return (values - self.mean.to(values.dtype)) / self.std.to(values.dtype)


@dataclass
class Classification:
    """Integer class labels 0..K-1; `num_classes` None until the training labels fix it."""

    num_classes: int | None = None
    names: tuple[str, ...] | None = None   # class names (string labels); None: "0".."K-1"
    class_weights: tuple[float, ...] | None = None   # --balance loss: a weight per class
    kind = "classification"

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The validation metrics (sensitivity and specificity only for two classes)."""
        return classification_metric_names(self.num_classes or 2)

    # -- labels --
    def label_columns(self, header: list[str]) -> list[int]:
        if "label" not in header:
            raise InputError("expected a 'label' column")
        return [header.index("label")]

    def scan(self, texts: list[str]) -> None:
        """See every row's label before any is parsed: labels none of which is an integer
        are class names, indexed in sorted order (for two classes the second name is the
        positive class of sensitivity and ROC). Only while the number of classes is open
        (a training CSV); integers mixed with other texts stay integer labels, whose
        parsing names the odd ones. ValueError for a single name."""
        if self.num_classes is not None or self.names is not None:
            return
        found = sorted({t for t in texts if t})
        if not found or any(_is_integer(t) for t in found):
            return
        if len(found) < 2:
            raise InputError(f"only one class ({', '.join(found)}) in the labels")
        self.names, self.num_classes = tuple(found), len(found)

    def parse_label(self, texts: list[str]) -> int:
        """One row's label; ValueError naming what is wrong (the CSV reader adds the line)."""
        if self.names is not None:
            if texts[0] not in self.names:
                raise InputError(f"label {texts[0]!r} is not one of the classes "
                                 f"{', '.join(self.names)}")
            return self.names.index(texts[0])
        try:
            label = int(texts[0])
        except ValueError:
            raise InputError(f"label {texts[0]!r} is not an integer") from None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            upper = f"{self.num_classes - 1}" if self.num_classes else "..."
            raise InputError(f"label {label} out of range 0..{upper}")
        return label

    def fit(self, labels: list[int]) -> None:
        """Fix the number of classes from the training labels (at least 2)."""
        if self.num_classes is None:
            self.num_classes = max(2, max(labels) + 1)

    def prepare_model(self, model: nn.Module, labels: list[int]) -> None:
        """Nothing of a new classifier depends on the labels."""

    def balance(self, how: str, labels: list[int]) -> np.ndarray | None:
        """Prepare class balance (`fit` first): "loss" weights the loss by scikit-learn's
        "balanced" class weights n / (classes present x n_class) (1 for a class without
        training images); "sampler" returns a probability per training image, equal for
        each class present in total; "none" does nothing. None unless "sampler"."""
        labels_array = np.asarray(labels)
        present = np.unique(labels_array)
        if how == "loss":
            weights = np.ones(self.outputs)
            weights[present] = compute_class_weight("balanced", classes=present,
                                                    y=labels_array)
            self.class_weights = tuple(float(w) for w in weights)
        if how != "sampler":
            return None
        counts = np.bincount(labels_array, minlength=self.outputs)
        per_image = 1.0 / (len(present) * counts[labels_array])
        return per_image / per_image.sum()

    def label_cells(self, label: int | None) -> list[str]:
        return ["" if label is None else self.class_names[label]]

    def label_header(self) -> list[str]:
        return ["label"]

    # -- the model --
    @property
    def outputs(self) -> int:
        assert self.num_classes is not None, "fit() first"
        return self.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Each class's name: the CSV's string labels, else its index as text."""
        return self.names or tuple(str(k) for k in range(self.outputs))

    def model_fields(self) -> dict[str, Any]:
        """What ModelConfig records of the task."""
        return {"num_classes": self.outputs, "task": self.kind, "targets": None,
                "class_names": list(self.names) if self.names else None}

    def loss(self, outputs: torch.Tensor, labels: list[int]) -> torch.Tensor:
        """Mean cross-entropy; with `class_weights`, each image's term times its class's
        weight (not renormalised per batch: one image is a batch here, and a weighted
        mean of one term would cancel its weight)."""
        target = torch.tensor(labels, device=outputs.device)
        if self.class_weights is None:
            return F.cross_entropy(outputs, target)
        weights = torch.tensor(self.class_weights, dtype=outputs.dtype, device=outputs.device)
        return (F.cross_entropy(outputs, target, reduction="none") * weights[target]).mean()

    # -- predictions --
    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        """(N, K) logits -> (N, K) softmax probabilities."""
        shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def metrics(self, predictions: np.ndarray, labels: list[int]) -> dict[str, float]:
        return classification_metrics(predictions, np.array(labels))

    def score(self, metrics: dict[str, Any]) -> list[float]:
        """What `best.pt` maximises, compared in order: AUC, accuracy (ties on AUC are
        common on small sets)."""
        return [_finite(metrics.get("val_auc")), _finite(metrics.get("val_accuracy"))]

    def prediction_header(self) -> list[str]:
        return [*(f"prob_{name}" for name in self.class_names), "pred"]

    def prediction_cells(self, prediction: np.ndarray) -> list[str]:
        return [*(f"{p:.6f}" for p in prediction), self.class_names[int(np.argmax(prediction))]]

    def validation_panels(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """curves.png's panels besides the loss: (title, [(series, metrics column)])."""
        binary = [("sensitivity", "val_sensitivity"), ("specificity", "val_specificity")] \
            if self.outputs == 2 else []
        return [("validation", [("accuracy", "val_accuracy"),
                                ("balanced accuracy", "val_balanced_accuracy"),
                                ("AUC", "val_auc"), ("macro F1", "val_macro_f1"), *binary])]

    def evaluate(self, predictions: np.ndarray, labels: list[int], level: str = "slide",
                 resamples: int = 1000, seed: int = 0) -> Evaluation:
        """The metrics, the AUC's 95% bootstrap interval (`resamples` seeded draws) and the
        confusion matrix of labelled predictions."""
        auc, low, high = bootstrap_auc(predictions, np.array(labels), resamples, seed)
        return Evaluation(level, len(labels), self.metrics(predictions, labels), (low, high),
                          confusion(np.array(labels), predictions.argmax(1), self.outputs),
                          list(self.class_names))

    def write_figures(self, prefix: Path, predictions: np.ndarray, labels: list[int]
                      ) -> list[Path]:
        """`<prefix>confusion.png` and `<prefix>roc.png` (one curve per class, one-vs-rest;
        class 1's for two classes) of labelled predictions."""
        labels_array = np.array(labels)
        names = list(self.class_names)
        matrix = confusion(labels_array, predictions.argmax(1), self.outputs)
        written = [confusion_plot(f"{prefix}confusion.png", matrix.tolist(), names)]
        curves = [Series(f"class {names[k]}", fpr, tpr)
                  for k, fpr, tpr in roc_curves(predictions, labels_array)]
        chance = Series("chance", [0.0, 1.0], [0.0, 1.0])
        written.append(line_plot(f"{prefix}roc.png", [Panel(
            "ROC", [*curves, chance], xlabel="false positive rate",
            ylabel="true positive rate")], width=560, panel_height=520))
        return written

    # -- saliency --
    def output_index(self, chosen: int | str) -> int:
        """The index of a class given by name or index (`saliency --class`); ValueError
        naming the classes when there is no such class."""
        if isinstance(chosen, str) and chosen in self.class_names:
            return self.class_names.index(chosen)
        if isinstance(chosen, int) or _is_integer(chosen):
            return int(chosen)
        raise InputError(f"no class {chosen!r}: the model's classes are "
                         f"{', '.join(self.class_names)}")

    def output_name(self, index: int) -> str:
        """'class NAME' ('class K' without names); ValueError when the model has no such
        class."""
        if not 0 <= index < self.outputs:
            raise InputError(f"class {index} out of range: the model has {self.outputs} "
                             f"classes (0..{self.outputs - 1}: "
                             f"{', '.join(self.class_names)})")
        return f"class {self.class_names[index]}"

    def explained(self, outputs: torch.Tensor, index: int | None) -> tuple[int, dict]:
        """Which output saliency differentiates (`index`, else the predicted class) and
        what the map's description records of the prediction."""
        logits = outputs.detach().double()
        predicted = int(logits.argmax())
        chosen = predicted if index is None else index
        self.output_name(chosen)
        return chosen, {"class": chosen, "predicted_class": predicted,
                        "class_names": list(self.class_names),
                        "probabilities": [round(p, 6) for p in
                                          torch.softmax(logits, 0).tolist()],
                        "logits": [round(v, 6) for v in logits.tolist()]}

    def summary(self, record: dict) -> str:
        """One line of what `explained` recorded."""
        names = self.class_names
        probabilities = ", ".join(f"{p:.3f}" for p in record["probabilities"])
        return (f"class {names[record['class']]} (predicted {names[record['predicted_class']]}"
                f"; probabilities {probabilities})")


@dataclass
class Regression:
    """Continuous targets: `targets` (their names) None until the training CSV's header
    names them; `loss` one of LOSSES; `standardise`: the loss sees targets scaled by the
    training labels' mean and standard deviation (`scale`, the model's TargetScale)."""

    targets: tuple[str, ...] | None = None
    loss_name: str = "mse"
    standardise: bool = True
    scale: TargetScale | None = field(default=None, repr=False)
    kind = "regression"
    metric_names = ("spearman", "pearson", "mae", "rmse")

    def __post_init__(self) -> None:
        if self.loss_name not in LOSSES:
            raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got "
                             f"{self.loss_name!r}")

    # -- labels --
    def label_columns(self, header: list[str]) -> list[int]:
        """`label`, or every `label_<name>` column; once known, the same targets again."""
        self.targets = self.targets or _target_names(header)
        columns = self._columns("label")
        missing = [c for c in columns if c not in header]
        if missing:
            raise InputError(f"expected the target columns {', '.join(columns)} (missing "
                             f"{', '.join(missing)})")
        return [header.index(c) for c in columns]

    def parse_label(self, texts: list[str]) -> tuple[float, ...]:
        values = []
        for column, text in zip(self._columns("label"), texts):
            try:
                value = float(text)
            except ValueError:
                raise InputError(f"{column} {text!r} is not a number") from None
            if not math.isfinite(value):
                raise InputError(f"{column} is {text}, not a finite number")
            values.append(value)
        return tuple(values)

    def scan(self, texts: list[str]) -> None:
        """Targets are numbers: nothing to learn from the texts before parsing them."""

    def output_index(self, chosen: int | str) -> int:
        """A target given by index (`saliency --target`)."""
        return int(chosen)

    def fit(self, labels: list[tuple[float, ...]]) -> None:
        """Nothing to fix before the model exists (the targets come from the header)."""

    def balance(self, how: str, labels: list[tuple[float, ...]]) -> None:
        """Regression has no classes to balance (TrainConfig refuses --balance)."""

    def prepare_model(self, model: nn.Module, labels: list[tuple[float, ...]]) -> None:
        """Set a new model's TargetScale from the training labels (mean, standard deviation;
        1 where a target is constant) and take the loss through it. A resumed run's
        checkpoint then restores the saved scale into the same module."""
        scale = model.head.scale
        values = torch.tensor(labels, dtype=torch.float64)
        if self.standardise:
            std = values.std(0, unbiased=False) if len(values) > 1 else torch.ones(
                values.shape[1], dtype=torch.float64)
            scale.mean.copy_(values.mean(0))
            scale.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        self.scale = scale

    def label_cells(self, label: tuple[float, ...] | None) -> list[str]:
        return [""] * self.outputs if label is None else [f"{v:g}" for v in label]

    def label_header(self) -> list[str]:
        return self._columns("label")

    # -- the model --
    @property
    def outputs(self) -> int:
        assert self.targets is not None, "read the training CSV first"
        return len(self.targets)

    def model_fields(self) -> dict[str, Any]:
        return {"num_classes": self.outputs, "task": self.kind, "targets": list(self.targets)}

    def loss(self, outputs: torch.Tensor, labels: list[tuple[float, ...]]) -> torch.Tensor:
        """The loss on standardised values (outputs are in the label's units)."""
        assert self.scale is not None, "prepare_model() or task_for_model() first"
        target = torch.tensor(labels, dtype=outputs.dtype, device=outputs.device)
        return LOSSES[self.loss_name](self.scale.standardise(outputs),
                                      self.scale.standardise(target))

    # -- predictions --
    def predictions(self, outputs: np.ndarray) -> np.ndarray:
        """The model's outputs are the predictions, in the label's units."""
        return outputs

    def metrics(self, predictions: np.ndarray, labels: list[tuple[float, ...]]
                ) -> dict[str, float]:
        """Spearman, Pearson, MAE, RMSE and the loss (as in training, standardised)."""
        values = regression_metrics(predictions, np.array(labels))
        if len(labels):
            with torch.no_grad():
                values["loss"] = float(self.loss(torch.as_tensor(predictions, dtype=torch.float64),
                                                 labels))
        else:
            values["loss"] = math.nan
        return values

    def score(self, metrics: dict[str, Any]) -> list[float]:
        return [_finite(metrics.get("val_spearman"))]

    def prediction_header(self) -> list[str]:
        return self._columns("prediction")

    def prediction_cells(self, prediction: np.ndarray) -> list[str]:
        return [f"{v:.6g}" for v in prediction]

    def validation_panels(self) -> list[tuple[str, list[tuple[str, str]]]]:
        return [("validation: correlation", [("Spearman", "val_spearman"),
                                             ("Pearson", "val_pearson")]),
                ("validation: error (label units)", [("MAE", "val_mae"),
                                                     ("RMSE", "val_rmse")])]

    def evaluate(self, predictions: np.ndarray, labels: list[tuple[float, ...]],
                 level: str = "slide", resamples: int = 1000, seed: int = 0) -> Evaluation:
        """The metrics of labelled predictions (no AUC, no confusion matrix)."""
        return Evaluation(level, len(labels), self.metrics(predictions, labels))

    def write_figures(self, prefix: Path, predictions: np.ndarray,
                      labels: list[tuple[float, ...]]) -> list[Path]:
        """None: the curves show a regression's validation."""
        return []

    # -- saliency --
    def output_name(self, index: int) -> str:
        """'target NAME' ('the predicted value' for one `label` column); ValueError when
        the model has no such target."""
        if not 0 <= index < self.outputs:
            raise InputError(f"target {index} out of range: the model predicts "
                             f"{self.outputs} target(s) (0..{self.outputs - 1})")
        return "the predicted value" if self.targets == ("label",) else \
            f"target {self.targets[index]}"

    def explained(self, outputs: torch.Tensor, index: int | None) -> tuple[int, dict]:
        """The gradient of target `index` (default the first) of the predicted values."""
        chosen = 0 if index is None else index
        self.output_name(chosen)
        values = outputs.detach().double().tolist()
        return chosen, {"target": chosen, "target_name": self.targets[chosen],
                        "predictions": [round(v, 6) for v in values]}

    def summary(self, record: dict) -> str:
        if self.targets == ("label",):
            return f"the predicted value ({record['predictions'][0]:.4g})"
        values = ", ".join(f"{n} {v:.4g}" for n, v in zip(self.targets, record["predictions"]))
        return f"{self.output_name(record['target'])} (predicted {values})"

    def _columns(self, prefix: str) -> list[str]:
        if self.targets == ("label",):
            return [prefix]
        return [f"{prefix}_{name}" for name in self.targets or ()]


Task = Classification | Regression


@dataclass
class Evaluation:
    """How labelled predictions score, at slide or patient level: the task's metrics, the
    AUC's 95% bootstrap interval and the confusion matrix (rows true, columns predicted)
    for classification."""

    level: str                                  # "slide" or "patient"
    count: int                                  # slides or patients
    metrics: dict[str, float]
    auc_ci: tuple[float, float] | None = None
    confusion: np.ndarray | None = None
    names: list[str] | None = None              # the classes, in the confusion's order

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "count": self.count, "metrics": self.metrics,
                "auc_ci95": None if self.auc_ci is None else list(self.auc_ci),
                "confusion": None if self.confusion is None else self.confusion.tolist(),
                "classes": self.names}


def evaluate_patients(task: Task, predictions: np.ndarray, labels: list, patients: list[str],
                      resamples: int = 1000, seed: int = 0) -> Evaluation:
    """`task.evaluate` with a patient's slides combined: the mean of their probabilities
    (or predicted values); ValueError where a patient's slides disagree on the label."""
    combined, patient_labels, _ = patient_level(predictions, labels, patients)
    return task.evaluate(combined, patient_labels, "patient", resamples, seed)


def selection_score(metrics: dict[str, Any], task: Task) -> list[float]:
    """What `best.pt` keeps, compared in order (larger is better): the task's validation
    metrics (AUC and accuracy, or Spearman), then the lowest val loss (train loss without a
    validation set). `metrics` is a row of metrics.csv."""
    loss_key = "val_loss" if metrics.get("val_loss") is not None else "train_loss"
    loss = metrics.get(loss_key)
    return [*task.score(metrics), -math.inf if loss is None or math.isnan(loss) else -loss]


def task_for_model(model: nn.Module, loss: str = "mse") -> Task:
    """The task a built or loaded model was made for (from its ModelConfig)."""
    config = model.config
    if config.task == "regression":
        task = Regression(tuple(config.targets), loss)
        task.scale = model.head.scale
        return task
    return Classification(config.num_classes,
                          tuple(config.class_names) if config.class_names else None)


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _target_names(header: list[str]) -> tuple[str, ...]:
    """('label',) for a `label` column, else the names of the `label_<name>` columns."""
    named = tuple(c[len("label_"):] for c in header if c.startswith("label_") and
                  len(c) > len("label_"))
    if "label" in header and named:
        raise InputError("give one 'label' column or several 'label_<name>' columns, not both")
    if "label" in header:
        return ("label",)
    if not named:
        raise InputError("expected a 'label' column (or 'label_<name>' columns, one per "
                         "target)")
    return named


def _finite(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else float(value)
