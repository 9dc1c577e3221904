"""Metrics for image-level predictions, from scikit-learn and scipy.

Classification: accuracy, balanced accuracy, macro F1, log loss, AUC (binary) or the macro
average of one-vs-rest AUCs over the classes present with both positives and negatives,
sensitivity and specificity (binary: class 1 is the positive class), the confusion matrix
and ROC curves. `bootstrap_auc` gives the AUC's percentile bootstrap confidence interval.
Regression: Spearman's and Pearson's correlations (scipy), mean absolute and root mean
squared error (scikit-learn), each averaged over the targets.

Patients: `patient_level` combines a patient's slides into one prediction, the mean of
their slides' probabilities or values (every slide of a patient must carry the same label).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from sstream.errors import InputError


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    positives = np.asarray(positives, dtype=bool)
    if positives.all() or not positives.any():
        return math.nan
    return float(skm.roc_auc_score(positives, np.asarray(scores, dtype=np.float64)))


def multiclass_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Binary AUC of class 1 for two classes; else the macro mean of one-vs-rest AUCs over
    the classes with both positives and negatives (NaN when there are none)."""
    if probabilities.shape[1] == 2:
        return binary_auc(probabilities[:, 1], labels == 1)
    per_class = [binary_auc(probabilities[:, k], labels == k)
                 for k in range(probabilities.shape[1])]
    valid = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(valid)) if valid else math.nan


def classification_metric_names(classes: int) -> tuple[str, ...]:
    """The metrics `classification_metrics` gives for `classes` classes (besides loss)."""
    binary = ("sensitivity", "specificity") if classes == 2 else ()
    return ("accuracy", "balanced_accuracy", "auc", "macro_f1", *binary)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics of `classification_metric_names` and the mean cross-entropy (`loss`).

    probabilities: (n, classes) rows summing to 1; labels: (n,) integer classes. Balanced
    accuracy is the mean recall over the classes present; macro F1 averages over all
    classes (an absent class that is never predicted counts 0)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    classes = probabilities.shape[1]
    names = classification_metric_names(classes)
    if len(labels) == 0:
        return {name: math.nan for name in (*names, "loss")}
    predicted = probabilities.argmax(1)
    every = list(range(classes))
    with warnings.catch_warnings():  # absent classes: sklearn warns, the values stay defined
        warnings.simplefilter("ignore")
        values = {
            "accuracy": float(skm.accuracy_score(labels, predicted)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predicted)),
            "auc": multiclass_auc(probabilities, labels),
            "macro_f1": float(skm.f1_score(labels, predicted, labels=every, average="macro",
                                           zero_division=0)),
            "loss": float(skm.log_loss(labels, np.clip(probabilities, 1e-12, 1.0),
                                       labels=every)) + 0.0,  # no -0.0
        }
    if classes == 2:
        values.update(sensitivity_specificity(labels, predicted))
    return values


def sensitivity_specificity(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Recall of class 1 (sensitivity) and of class 0 (specificity); NaN for a class with
    no examples."""
    matrix = confusion(labels, predicted, 2)
    (tn, fp), (fn, tp) = matrix.tolist()  # plain ints: metrics travel in checkpoints
    return {"sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan}


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    return skm.confusion_matrix(np.asarray(labels, dtype=np.int64),
                                np.asarray(predicted, dtype=np.int64),
                                labels=list(range(classes)))


def roc_curves(probabilities: np.ndarray, labels: np.ndarray
               ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class, false positive rates, true positive rates): class 1's curve for two classes,
    else one-vs-rest for every class with both positives and negatives."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    classes = [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1])
    curves = []
    for k in classes:
        positives = labels == k
        if positives.any() and not positives.all():
            fpr, tpr, _ = skm.roc_curve(positives, probabilities[:, k])
            curves.append((k, fpr, tpr))
    return curves


def bootstrap_auc(probabilities: np.ndarray, labels: np.ndarray, resamples: int = 1000,
                  seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, low, high): the AUC and its percentile bootstrap confidence interval.

    `resamples` draws of n cases with replacement from a generator seeded with `seed` (the
    same inputs give the same interval); draws holding a single class have no AUC and are
    left out. NaN where the AUC itself is undefined."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    auc = multiclass_auc(probabilities, labels) if len(labels) else math.nan
    if math.isnan(auc):
        return auc, math.nan, math.nan
    generator = np.random.default_rng(seed)
    draws = [multiclass_auc(probabilities[pick], labels[pick])
             for pick in generator.integers(0, len(labels), (resamples, len(labels)))]
    draws = np.array([d for d in draws if not math.isnan(d)])
    if len(draws) == 0:
        return auc, math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return auc, float(low), float(high)


def patient_level(predictions: np.ndarray, labels: Sequence, patients: Sequence[str]
                  ) -> tuple[np.ndarray, list, list[str]]:
    """One row per patient (in order of first appearance): the mean of their slides'
    predictions, their label and their name. ValueError naming a patient whose slides
    carry different labels."""
    predictions = np.asarray(predictions, dtype=np.float64)
    rows: dict[str, list[int]] = {}
    for index, patient in enumerate(patients):
        rows.setdefault(patient, []).append(index)
    combined, patient_labels = [], []
    for patient, indices in rows.items():
        found = {_hashable(labels[i]) for i in indices}
        if len(found) > 1:
            raise InputError(f"patient {patient!r} has slides with different labels "
                             f"({', '.join(sorted(map(str, found)))})")
        combined.append(predictions[indices].mean(0))
        patient_labels.append(labels[indices[0]])
    return np.stack(combined), patient_labels, list(rows)


def _hashable(label: object) -> object:
    return tuple(label) if isinstance(label, (list, np.ndarray)) else label


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Spearman, Pearson, MAE and RMSE of (n, targets) predictions, averaged over targets
    (a correlation that is undefined for a target, e.g. constant labels, is left out)."""
    if len(targets) == 0:
        return {"spearman": math.nan, "pearson": math.nan, "mae": math.nan, "rmse": math.nan}
    predictions = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)

    def mean_over_targets(correlation) -> float:  # noqa: ANN001
        values = [_correlation(correlation, predictions[:, k], targets[:, k])
                  for k in range(targets.shape[1])]
        valid = [v for v in values if not math.isnan(v)]
        return float(np.mean(valid)) if valid else math.nan

    return {"spearman": mean_over_targets(stats.spearmanr),
            "pearson": mean_over_targets(stats.pearsonr),
            "mae": float(skm.mean_absolute_error(targets, predictions)),
            "rmse": float(skm.root_mean_squared_error(targets, predictions))}


def _correlation(correlation, a: np.ndarray, b: np.ndarray) -> float:  # noqa: ANN001
    """scipy's correlation statistic; NaN where it is undefined (n < 2, a constant)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(correlation(a, b).statistic)
