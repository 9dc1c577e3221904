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


# ---- clinical metrics, confidence intervals, patients ----------------------------------

from sstream.metrics import (  # noqa: E402
    bootstrap_auc,
    classification_metric_names,
    patient_level,
    roc_curves,
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 0.99), st.integers(0, 1)), min_size=2, max_size=30))
def test_binary_metrics_equal_counting(pairs):
    """Sensitivity, specificity, balanced accuracy and macro F1 from the four counts."""
    p1 = np.array([p for p, _ in pairs])
    labels = np.array([y for _, y in pairs])
    got = classification_metrics(np.stack([1 - p1, p1], 1), labels)
    predicted = (p1 > 0.5).astype(int)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    for name, want in (("sensitivity", sens), ("specificity", spec)):
        assert (math.isnan(got[name]) and math.isnan(want)) or math.isclose(got[name], want)
    present = [v for v in (sens, spec) if not math.isnan(v)]
    assert math.isclose(got["balanced_accuracy"], np.mean(present))

    def f1(t, f_p, f_n):
        return 2 * t / (2 * t + f_p + f_n) if t + f_p + f_n else 0.0

    assert math.isclose(got["macro_f1"], (f1(tp, fp, fn) + f1(tn, fn, fp)) / 2)
    assert set(got) == {*classification_metric_names(2), "loss"}
    assert all(type(v) is float for v in got.values())  # checkpoints hold plain floats


def test_multiclass_has_no_sensitivity_and_roc_per_class():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5],
                              [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 2, 1])
    assert "sensitivity" not in classification_metrics(probabilities, labels)
    curves = roc_curves(probabilities, labels)
    assert [k for k, _, _ in curves] == [0, 1, 2]
    for _, fpr, tpr in curves:
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_bootstrap_interval_is_seeded_holds_the_auc_and_narrows_with_more_cases():
    generator = np.random.default_rng(3)

    def cases(n):
        labels = generator.integers(0, 2, n)
        p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + generator.normal(0, 0.25, n), 0, 1)
        return np.stack([1 - p1, p1], 1), labels

    small, large = cases(30), cases(600)
    auc, low, high = bootstrap_auc(*small, resamples=1000, seed=7)
    assert (auc, low, high) == bootstrap_auc(*small, resamples=1000, seed=7)
    assert bootstrap_auc(*small, resamples=1000, seed=8) != (auc, low, high)
    assert low < auc < high and math.isclose(auc, binary_auc(small[0][:, 1], small[1] == 1))
    _, low_large, high_large = bootstrap_auc(*large, resamples=300, seed=7)
    assert high_large - low_large < (high - low) / 2
    assert all(math.isnan(v) for v in bootstrap_auc(np.array([[0.4, 0.6]] * 3),
                                                    np.array([1, 1, 1])))


def test_patient_level_averages_slides_and_refuses_disagreeing_labels():
    predictions = np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    combined, labels, patients = patient_level(predictions, [1, 1, 0], ["a", "a", "b"])
    assert patients == ["a", "b"] and labels == [1, 0]
    np.testing.assert_allclose(combined, [[0.4, 0.6], [0.9, 0.1]])
    try:
        patient_level(predictions, [1, 0, 0], ["a", "a", "b"])
    except ValueError as exc:
        assert "patient 'a'" in str(exc)
    else:
        raise AssertionError("disagreeing labels were accepted")
