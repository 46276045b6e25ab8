import numpy as np
import pytest

from metrics import MIN_FALSE_ACCEPTS, accuracy, best_threshold, report, roc, thresholds_by_kind, verification_metrics


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
    assert "tar@far=0.01" not in m and "tar@far=0.001" not in m  # 4 negatives resolve no such FAR
    assert m["acc"] == pytest.approx(7 / 8) and m["threshold"] == 0.5 and m["pairs"] == 8
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
    assert not any(k.startswith("tar") for k in m)  # ~250 negatives: 1% would be 2.5 pairs



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


def test_tar_at_far_only_where_the_negatives_resolve_it():
    rng = np.random.default_rng(2)
    for negatives, expected in ((350, set()), (1000, {"tar@far=0.01"}), (10000, {"tar@far=0.01", "tar@far=0.001"})):
        labels = np.r_[np.ones(500), np.zeros(negatives)]
        scores = labels + rng.normal(size=len(labels))
        m = verification_metrics(scores, labels, 0.5)
        assert {k for k in m if k.startswith("tar")} == expected, negatives
    # known value: 1000 negatives 0..999 / 1000, positives above all but the top 10 negatives
    labels = np.r_[np.ones(4), np.zeros(1000)]
    scores = np.r_[[2.0, 1.0, 0.9945, 0.5], np.arange(1000) / 1000]
    assert verification_metrics(scores, labels, 0.5)["tar@far=0.01"] == pytest.approx(0.75)
    assert MIN_FALSE_ACCEPTS == 10


def test_adjacent_float32_scores_threshold_is_exact():
    """A float64 midpoint between two adjacent float32 scores, compared in float32, rounds onto one of them."""
    a = np.float32(0.7)
    for _ in range(4):  # both parities of the last mantissa bit: round-half-to-even goes both ways
        b = np.nextafter(a, np.float32(1))  # the next float32 up
        scores = np.array([b, a, a, 0.1, 0.9], dtype=np.float32)
        labels = np.array([1, 0, 0, 0, 1])
        t, acc = best_threshold(scores, labels)
        assert acc == 1.0 and accuracy(scores, labels, t) == 1.0
        assert float(a) < t <= float(b)
        r = report(scores, labels, np.array(["FF"] * 5), {"all": t, "FF": t})
        assert r["all"]["acc"] == r["FF"]["acc"] == 1.0
        a = b
    rng = np.random.default_rng(3)
    for _ in range(50):  # many near-ties in float32: the accuracy is the exact (float64) maximum
        scores = (0.5 + rng.integers(0, 40, 200) * np.finfo(np.float32).eps).astype(np.float32)
        labels = rng.integers(0, 2, 200)
        t, acc = best_threshold(scores, labels)
        exact = scores.astype(np.float64)
        brute = max(np.mean((exact >= c) == labels) for c in np.r_[exact, exact.max() + 1])
        assert acc == brute and accuracy(scores, labels, t) == brute


def test_one_class_gives_nan_with_a_warning():
    with pytest.warns(UserWarning, match="undefined"):
        m = verification_metrics(np.array([0.2, 0.9]), np.array([1, 1]), 0.5)
    assert np.isnan(m["auc"]) and np.isnan(m["eer"]) and m["acc"] == 0.5
    assert not any(k.startswith("tar") for k in m)


def test_thresholds_by_kind_are_chosen_per_kind():
    # FF pairs score high, FP pairs low: one shared threshold cannot separate both, per-kind ones can
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    kinds = np.array(["FF"] * 4 + ["FP"] * 4)
    chosen = thresholds_by_kind(scores, labels, kinds)
    assert chosen["FF"][1] == chosen["FP"][1] == 1.0 and chosen["all"][1] == 0.75
    assert 0.7 < chosen["FF"][0] <= 0.8 and 0.2 < chosen["FP"][0] <= 0.3
    r = report(scores, labels, kinds, {k: t for k, (t, _) in chosen.items()})
    assert r["FF"]["acc"] == r["FP"]["acc"] == 1.0 and r["all"]["acc"] == 0.75
    assert r["FF"]["threshold"] == chosen["FF"][0] and r["FF"]["pairs"] == 4
