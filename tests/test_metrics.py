"""AUC and friends against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sstream.metrics import binary_auc, classification_metrics


def pairwise_auc(scores, positives) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_binary_auc_equals_pair_counting_with_ties(pairs):
    scores = np.array([s / 5 for s, _ in pairs])
    positives = np.array([p for _, p in pairs])
    if positives.all() or not positives.any():
        assert math.isnan(binary_auc(scores, positives))
    else:
        assert math.isclose(binary_auc(scores, positives), pairwise_auc(scores, positives))


def test_multiclass_macro_auc_accuracy_and_loss():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5],
                              [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 2, 1])
    metrics = classification_metrics(probabilities, labels)
    expected_auc = np.mean([pairwise_auc(probabilities[:, k], labels == k) for k in range(3)])
    assert math.isclose(metrics["auc"], expected_auc)
    assert metrics["accuracy"] == 0.75
    expected_loss = -np.mean(np.log([0.7, 0.6, 0.5, 0.4]))
    assert math.isclose(metrics["loss"], expected_loss)


# ---- regression ---------------------------------------------------------------------------

from hypothesis import settings  # noqa: E402
from scipy import stats  # noqa: E402

from sstream.metrics import regression_metrics  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=3, max_size=30))
def test_spearman_and_pearson_equal_scipys_with_ties(pairs):
    predictions = np.array([p / 2 for p, _ in pairs], dtype=float)
    targets = np.array([t * 1.5 for _, t in pairs], dtype=float)
    got = regression_metrics(predictions[:, None], targets[:, None])
    if np.ptp(predictions) == 0 or np.ptp(targets) == 0:
        assert math.isnan(got["spearman"]) and math.isnan(got["pearson"])
        return
    assert math.isclose(got["spearman"], stats.spearmanr(predictions, targets).statistic,
                        abs_tol=1e-12)
    assert math.isclose(got["pearson"], stats.pearsonr(predictions, targets).statistic,
                        abs_tol=1e-12)


def test_errors_and_several_targets_average_per_target():
    predictions = np.array([[1.0, 10.0], [2.0, 30.0], [4.0, 20.0]])
    targets = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0]])
    got = regression_metrics(predictions, targets)
    assert math.isclose(got["mae"], np.mean([(0 + 1 + 1) / 3, (0 + 10 + 10) / 3]))
    assert math.isclose(got["rmse"], np.mean([math.sqrt(2 / 3), math.sqrt(200 / 3)]))
    expected = np.mean([stats.spearmanr(predictions[:, k], targets[:, k]).statistic
                        for k in range(2)])
    assert math.isclose(got["spearman"], expected)
    assert all(math.isnan(v) for v in regression_metrics(np.empty((0, 1)),
                                                          np.empty((0, 1))).values())
