"""Classification metrics for image-level predictions (numpy only, no sklearn).

AUC is the Mann-Whitney statistic (ties count half); for more than two classes the macro
average of one-vs-rest AUCs over the classes present with both positives and negatives.
"""

from __future__ import annotations

import math

import numpy as np


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
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
