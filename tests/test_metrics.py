import numpy as np
import pytest

from evaluate import accuracy, best_threshold, roc, verification_metrics


def test_hand_made_scores():
    # 4 positives, 4 negatives; one negative (0.7) outranks two positives (0.6, 0.55)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0])
    fpr, tpr, thr = roc(scores, labels)
    assert fpr.tolist() == [0, 0, 0, 0.25, 0.25, 0.25, 0.5, 0.75, 1.0]
    assert tpr.tolist() == [0, 0.25, 0.5, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    m = verification_metrics(scores, labels, threshold=0.5)
    assert m["auc"] == pytest.approx(14 / 16)     # the negative 0.7 outranks 2 of the 16 (pos, neg) pairs
    assert m["eer"] == pytest.approx(0.25)
    assert m["tar@far=0.01"] == pytest.approx(0.5)
    assert m["tar@far=0.001"] == pytest.approx(0.5)
    assert m["acc"] == pytest.approx(7 / 8)
    t, acc = best_threshold(scores, labels)
    assert acc == pytest.approx(7 / 8) and 0.3 < t < 0.55
    assert accuracy(scores, labels, t) == acc


def test_ties_share_one_roc_point():
    fpr, tpr, thr = roc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([1, 0, 1, 0]))
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1]
    assert verification_metrics(np.array([0.5] * 4), np.array([1, 0, 1, 0]), 0.5)["auc"] == 0.5


def test_separable_scores_are_perfect():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = labels + rng.uniform(0, 0.9, 500)
    t, acc = best_threshold(scores, labels)
    m = verification_metrics(scores, labels, t)
    assert acc == 1.0 and m["acc"] == 1.0 and m["auc"] == 1.0 and m["eer"] == 0.0
    assert m["tar@far=0.001"] == 1.0


def test_shuffled_labels_are_chance():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20000)
    scores = labels + rng.uniform(0, 0.9, 20000)
    shuffled = rng.permutation(labels)
    m = verification_metrics(scores, shuffled, 0.95)
    assert m["auc"] == pytest.approx(0.5, abs=0.02)
    assert m["eer"] == pytest.approx(0.5, abs=0.02)
    assert m["acc"] == pytest.approx(0.5, abs=0.02)


def test_threshold_search_is_exact():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = np.round(rng.normal(size=60), 1)  # many ties
        labels = (scores + rng.normal(size=60) > 0).astype(int)
        t, acc = best_threshold(scores, labels)
        brute = max(accuracy(scores, labels, c) for c in np.r_[scores, scores.max() + 1])
        assert acc == pytest.approx(brute) and accuracy(scores, labels, t) == pytest.approx(acc)
