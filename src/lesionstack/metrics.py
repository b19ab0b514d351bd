"""The ISIC 2024 metric: partial ROC AUC above a minimum true-positive rate (80% by default).

The competition flips the problem: with labels `1 - y` and scores `-p`, the region TPR >= 0.8 of the
original ROC becomes FPR <= 0.2 of the flipped one. The partial area there lies in [0, max_fpr]:
a perfect ranking scores 0.2 and a constant (or random) one 0.02 (the triangle under the diagonal).

`pauc` is the one pure function; `optuna_objective_value` is what a tuning study maximises.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score, roc_curve

PAUC_MAX = 0.2
PAUC_CONSTANT = 0.02


class MetricError(ValueError):
    """Inputs on which pAUC is undefined (one class only, mismatched lengths, NaN scores)."""


def _check(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise MetricError(f"y_true has {y.size} values but y_score has {p.size}")
    if y.size == 0:
        raise MetricError("pAUC of an empty set is undefined")
    if not np.isin(y, (0.0, 1.0)).all():
        raise MetricError("y_true must hold only 0 and 1")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "positives" if n_pos else "negatives"
        raise MetricError(f"pAUC needs both classes; got {y.size} {only} only")
    if not np.isfinite(p).all():
        raise MetricError(f"y_score holds {int((~np.isfinite(p)).sum())} non-finite value(s)")
    return y, p


def pauc(y_true: ArrayLike, y_score: ArrayLike, min_tpr: float = 0.8) -> float:
    """Partial AUC above `min_tpr`, exactly as scored in ISIC 2024 (range [0, 1 - min_tpr]).

    The official formulation: flip labels and negate scores, take the ROC curve, cut it at
    FPR = 1 - min_tpr with one linearly interpolated point, integrate with the trapezoid rule.
    """
    y, p = _check(y_true, y_score)
    max_fpr = 1.0 - min_tpr
    fpr, tpr, _ = roc_curve(1.0 - y, -p)
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x_interp = [fpr[stop - 1], fpr[stop]] if stop < len(fpr) else [fpr[-1], fpr[-1]]
    y_interp = [tpr[stop - 1], tpr[stop]] if stop < len(fpr) else [tpr[-1], tpr[-1]]
    tpr = np.append(tpr[:stop], np.interp(max_fpr, x_interp, y_interp))
    fpr = np.append(fpr[:stop], max_fpr)
    return float(np.trapezoid(tpr, fpr))


def pauc_mcclish(y_true: ArrayLike, y_score: ArrayLike, min_tpr: float = 0.8) -> float:
    """The second official formulation: scikit-learn's McClish-standardised partial AUC, un-standardised.

    Kept beside `pauc` because the two must agree; the tests check that they do.
    """
    y, p = _check(y_true, y_score)
    max_fpr = 1.0 - min_tpr
    s = roc_auc_score(1.0 - y, -p, max_fpr=max_fpr)
    low = 0.5 * max_fpr**2  # area of the diagonal's part, the chance level
    return float(low + (max_fpr - low) / 0.5 * (s - 0.5))


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Plain ROC AUC with the same input checks as `pauc`."""
    y, p = _check(y_true, y_score)
    return float(roc_auc_score(y, p))


def optuna_objective_value(fold_scores: list[float]) -> float:
    """What an Optuna study maximises: the mean fold pAUC."""
    if not fold_scores:
        raise MetricError("no fold scores to average")
    return float(np.mean(fold_scores))


TOP_N = 15


def top_n_sensitivity(y_true: ArrayLike, y_score: ArrayLike, patient: ArrayLike, n: int = TOP_N) -> float:
    """ISIC 2024's secondary prize metric, "top-15 retrieval sensitivity": for each patient with at least one
    malignant lesion, the share of that patient's malignant lesions among the patient's `n` highest-scored
    lesions; then the mean over those patients (patients without a malignant lesion are left out).

    As in the organisers' scorer (ISIC-Research/Challenge-2024-Metrics, SecondaryMetric-TopNSensitivity.py:
    `target_fraction` summed over each patient's `nlargest(15)` rows, divided by the number of patients with a
    malignancy), a patient with 15 or fewer lesions scores 1, and ties at the cut keep the rows that come first.
    Range [0, 1].
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_score, dtype=np.float64).ravel()
    g = np.asarray(patient).ravel()
    if not (y.shape == p.shape == g.shape):
        raise MetricError(f"y_true, y_score and patient have {y.size}, {p.size} and {g.size} values")
    if not np.isin(y, (0.0, 1.0)).all():
        raise MetricError("y_true must hold only 0 and 1")
    if not np.isfinite(p).all():
        raise MetricError(f"y_score holds {int((~np.isfinite(p)).sum())} non-finite value(s)")
    if n < 1:
        raise MetricError(f"n must be at least 1, got {n}")
    codes = np.unique(g, return_inverse=True)[1]
    positives = np.bincount(codes, weights=y)
    if not positives.any():
        raise MetricError("top-N sensitivity needs at least one malignant lesion")
    # by patient, then score descending, then original row order (pandas nlargest keeps the first of ties)
    order = np.lexsort((np.arange(y.size), -p, codes))
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, sorted_codes, side="left")
    within = np.arange(y.size) - starts  # 0-based rank inside the patient
    found = np.bincount(sorted_codes[within < n], weights=y[order][within < n], minlength=positives.size)
    with_cancer = positives > 0
    return float(np.mean(found[with_cancer] / positives[with_cancer]))


# ---- multi-class diagnosis: the metrics of ISIC 2018/2019 Task 3 and HAM10000 -----------------------------


def _check_multiclass(y_true: ArrayLike, proba: ArrayLike | None, n_classes: int | None
                      ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Integer labels (N,) in [0, K) and optional class probabilities (N, K); returns (y, proba, K)."""
    y = np.asarray(y_true).ravel()
    if y.size == 0:
        raise MetricError("a multi-class metric of an empty set is undefined")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise MetricError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    p = None if proba is None else np.asarray(proba, dtype=np.float64)
    k = n_classes or (p.shape[1] if p is not None and p.ndim == 2 else int(y.max()) + 1)
    if y.min() < 0 or y.max() >= k:
        raise MetricError(f"y_true holds class index {int(y.max()) if y.max() >= k else int(y.min())}, "
                          f"outside 0..{k - 1}")
    if p is not None:
        if p.shape != (y.size, k):
            raise MetricError(f"class probabilities have shape {p.shape}, expected ({y.size}, {k})")
        if not np.isfinite(p).all():
            raise MetricError(f"class probabilities hold {int((~np.isfinite(p)).sum())} non-finite value(s)")
    return y, p, k


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int | None = None) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class (scikit-learn's orientation)."""
    y, _, k = _check_multiclass(y_true, None, n_classes)
    pred, _, _ = _check_multiclass(y_pred, None, k)
    if pred.size != y.size:
        raise MetricError(f"y_true has {y.size} values but y_pred has {pred.size}")
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def row_normalised(matrix: ArrayLike) -> np.ndarray:
    """A confusion matrix with each row divided by its total (a row of zeros stays zeros)."""
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


def per_class_sensitivity(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int | None = None) -> np.ndarray:
    """Recall of each class (K,); NaN for a class absent from y_true."""
    m = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    support = m.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(m) / support, np.nan)


def per_class_specificity(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int | None = None) -> np.ndarray:
    """Of the lesions not in class c, the share not predicted c (K,); NaN when every lesion is class c."""
    m = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    negatives = m.sum() - m.sum(axis=1)
    true_negatives = negatives - (m.sum(axis=0) - np.diag(m))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(negatives > 0, true_negatives / negatives, np.nan)


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in y_true: the ISIC 2018/2019 Task 3 headline metric
    (equal to scikit-learn's `balanced_accuracy_score`)."""
    return float(np.nanmean(per_class_sensitivity(y_true, y_pred, n_classes)))


def one_vs_rest_auc(y_true: ArrayLike, proba: ArrayLike, n_classes: int | None = None) -> np.ndarray:
    """ROC AUC of each class's probability against all other classes (K,); NaN for a class absent from
    y_true (or the only one present)."""
    y, p, k = _check_multiclass(y_true, proba, n_classes)
    assert p is not None
    out = np.full(k, np.nan)
    for c in range(k):
        positive = y == c
        if 0 < positive.sum() < y.size:
            out[c] = roc_auc_score(positive, p[:, c])
    return out


def macro_auc(y_true: ArrayLike, proba: ArrayLike, n_classes: int | None = None) -> float:
    """Unweighted mean of the one-vs-rest AUCs over the classes present (scikit-learn's
    `roc_auc_score(..., multi_class="ovr", average="macro")` when every class is present)."""
    aucs = one_vs_rest_auc(y_true, proba, n_classes)
    if np.isnan(aucs).all():
        raise MetricError("macro AUC needs at least two classes present in y_true")
    return float(np.nanmean(aucs))
