"""Verification metrics (numpy only).

Convention: a pair is predicted "same" when its score >= threshold. Scores and thresholds are compared
in float64, so a threshold halfway between two float32 scores never rounds onto one of them.
"""
import warnings

import numpy as np

import align

FARS = (1e-2, 1e-3)
MIN_FALSE_ACCEPTS = 10  # a TAR@FAR is quoted only where FAR x negatives >= this many pairs


class NonFiniteScores(ValueError):
    pass


def _arrays(scores, labels):
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():  # a NaN would sort anywhere and make every figure meaningless
        bad = int((~np.isfinite(scores)).sum())
        raise NonFiniteScores(f"{bad} of {len(scores)} scores are not finite (NaN or infinite): the network's "
                              f"outputs are broken, so no metric is computed")
    return scores, np.asarray(labels).astype(bool)


def roc(scores, labels):
    """ROC from one sort: (fpr, tpr, thresholds), thresholds = distinct scores, descending.

    Point 0 is (0, 0) at threshold +inf; point i > 0 predicts "same" for score >= thresholds[i]."""
    scores, labels = _arrays(scores, labels)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    p, n = max(y.sum(), 1), max((~y).sum(), 1)
    return np.r_[0, fps] / n, np.r_[0, tps] / p, np.r_[np.inf, s[last]]


def auc(fpr, tpr):
    """Area under the ROC curve, trapezoidal (exact for the step ROC with ties as one point)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def accuracy(scores, labels, threshold):
    scores, labels = _arrays(scores, labels)
    return float(np.mean((scores >= np.float64(threshold)) == labels))


def best_threshold(scores, labels):
    """Exact accuracy-maximising threshold: every gap between sorted distinct scores is a candidate.

    Returns (threshold, accuracy), the accuracy being exactly accuracy(scores, labels, threshold)."""
    scores, labels = _arrays(scores, labels)
    if len(scores) == 0:
        return float("nan"), float("nan")
    fpr, tpr, thr = roc(scores, labels)
    p, n = labels.sum(), (~labels).sum()
    acc = (tpr * p + (1 - fpr) * n) / len(labels)
    i = int(np.argmax(acc))
    if i == 0:
        t = thr[1] + 1.0                       # everything "different"
    elif i == len(thr) - 1:
        t = thr[i]                             # everything "same"
    else:
        t = (thr[i] + thr[i + 1]) / 2          # midway to the next lower score
        if not thr[i + 1] < t <= thr[i]:       # adjacent doubles: the midpoint rounds onto one of them
            t = thr[i]
    return float(t), accuracy(scores, labels, t)


def verification_metrics(scores, labels, threshold):
    """Accuracy at a given threshold, AUC, EER, and TAR at the FARs this many negatives can resolve.

    With only one class present, AUC, EER and TAR are undefined: NaN, with a warning."""
    scores, labels = _arrays(scores, labels)
    pos, neg = int(labels.sum()), int((~labels).sum())
    out = {"pairs": len(labels), "threshold": float(threshold), "acc": accuracy(scores, labels, threshold)}
    if pos == 0 or neg == 0:
        warnings.warn(f"{len(labels)} pairs with only {'same' if neg == 0 else 'different'}-identity pairs: "
                      f"AUC, EER and TAR@FAR are undefined (NaN)", stacklevel=2)
        return {**out, "auc": float("nan"), "eer": float("nan")}
    fpr, tpr, _ = roc(scores, labels)
    out["auc"] = auc(fpr, tpr)
    fnr = 1 - tpr
    i = int(np.argmax(fnr <= fpr))              # first point past the crossing (fnr falls, fpr rises)
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    w = d0 / (d0 - d1) if d0 != d1 else 0.0
    out["eer"] = float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))
    out.update(tar_at_far(fpr, tpr, neg))
    return out


def tar_at_far(fpr, tpr, negatives):
    """{"tar@far=F": TAR} for each F of FARS at which at least MIN_FALSE_ACCEPTS negatives are accepted."""
    return {f"tar@far={far:g}": float(tpr[np.searchsorted(fpr, far, side="right") - 1])
            for far in FARS if far * negatives >= MIN_FALSE_ACCEPTS}


def thresholds_by_kind(scores, labels, kinds, names=("FF", "FP")):
    """{"all": (threshold, acc), "FF": ..., "FP": ...}: each chosen on its own pairs."""
    out = {"all": best_threshold(scores, labels)}
    for kind in names:
        sel = kinds == kind
        if sel.any():
            out[kind] = best_threshold(scores[sel], labels[sel])
    return out


def report(scores, labels, kinds, thresholds, names=("FF", "FP")):
    """Metrics of all pairs at the mixed threshold and of each kind at its own threshold."""
    out = {}
    for kind in ("all",) + tuple(names):
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        if sel.any() and kind in thresholds:
            out[kind] = verification_metrics(scores[sel], labels[sel], thresholds[kind])
    return out


def mean_found(errors):
    """The mean error over the faces found (a face not found has a NaN error); NaN when none was found."""
    errors = np.asarray(errors, dtype=float)
    errors = errors[~np.isnan(errors)]
    return float(errors.mean()) if len(errors) else float("nan")


def nme(pred, true, poses):
    """Mean landmark error of each face, normalised by the side sqrt(w h) of its (given) face box."""
    box = np.stack([align.face_box(t, p) for t, p in zip(true, poses)])
    side = np.sqrt((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))
    return np.linalg.norm(pred - true, axis=2).mean(1) / side


def precision_recall(doubt, hit, face):
    """For each threshold on P(no face) (found where it is below), precision, recall (faces found at their
    place) and the false-face rate of the pictures without one. doubt, hit, face: (N,) -> (T, 4) rows."""
    order = np.argsort(doubt)
    d, hit, face = doubt[order], hit[order], face[order]
    tp, found = np.cumsum(hit), np.arange(1, len(d) + 1)
    false_faces = np.cumsum(~face)
    edges = np.append((d[:-1] + d[1:]) / 2, 1.0)  # just above each picture's doubt
    return np.stack([edges, tp / found, tp / max(face.sum(), 1), false_faces / max((~face).sum(), 1)], 1)
