"""Metrics for image-level predictions (numpy only, no sklearn or scipy).

Classification: AUC is the Mann-Whitney statistic (ties count half); for more than two
classes the macro average of one-vs-rest AUCs over the classes present with both positives
and negatives. Regression: Spearman's rank correlation (tied values share their average
rank, as scipy.stats.spearmanr), Pearson's correlation, mean absolute and root mean squared
error, each averaged over the targets.
"""

from __future__ import annotations

import math

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the average of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(values[order])) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, AUC (binary) or macro one-vs-rest AUC, and mean cross-entropy (log loss).

    probabilities: (n, classes) rows summing to 1; labels: (n,) integer classes.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"accuracy": math.nan, "auc": math.nan, "loss": math.nan}
    accuracy = float((probabilities.argmax(1) == labels).mean())
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()) + 0.0  # no -0.0
    if probabilities.shape[1] == 2:
        auc = binary_auc(probabilities[:, 1], labels == 1)
    else:
        per_class = [binary_auc(probabilities[:, k], labels == k)
                     for k in range(probabilities.shape[1])]
        valid = [a for a in per_class if not math.isnan(a)]
        auc = float(np.mean(valid)) if valid else math.nan
    return {"accuracy": accuracy, "auc": auc, "loss": loss}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two (n,) arrays; NaN when either is constant or n < 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else math.nan


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's on average ranks (ties as scipy's)."""
    return pearson(average_ranks(a), average_ranks(b))


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Spearman, Pearson, MAE and RMSE of (n, targets) predictions, averaged over targets
    (a correlation that is undefined for a target, e.g. constant labels, is left out)."""
    if len(targets) == 0:
        return {"spearman": math.nan, "pearson": math.nan, "mae": math.nan, "rmse": math.nan}
    predictions = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)

    def mean_over_targets(metric) -> float:  # noqa: ANN001
        values = [metric(predictions[:, k], targets[:, k]) for k in range(targets.shape[1])]
        valid = [v for v in values if not math.isnan(v)]
        return float(np.mean(valid)) if valid else math.nan

    errors = predictions - targets
    return {"spearman": mean_over_targets(spearman), "pearson": mean_over_targets(pearson),
            "mae": float(np.abs(errors).mean(0).mean()),
            "rmse": float(np.sqrt((errors ** 2).mean(0)).mean())}
