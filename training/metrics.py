"""Classification metrics, calibration (temperature scaling, ECE) and the operating point."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Mapping

import numpy as np

ECE_BINS = 15


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def logit(p: np.ndarray) -> np.ndarray:
    """The inverse of `sigmoid`, for probabilities clipped away from 0 and 1."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties get average ranks)."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    i = 0
    while i < len(sorted_scores):
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.unique(np.concatenate([[np.inf], scores]))[::-1]
    labels = np.asarray(labels).astype(bool)
    tpr = np.array([(scores[labels] >= t).mean() for t in thresholds])
    fpr = np.array([(scores[~labels] >= t).mean() for t in thresholds])
    return fpr, tpr


def ece(labels: np.ndarray, p_pneumonia: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the predicted class's confidence (top-label ECE)."""
    labels = np.asarray(labels).astype(int)
    predicted = (p_pneumonia >= 0.5).astype(int)
    confidence = np.where(predicted == 1, p_pneumonia, 1.0 - p_pneumonia)
    correct = (predicted == labels).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        mask = (confidence > low) & (confidence <= high) if low > 0.5 else (confidence <= high)
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood (golden-section search on log T)."""
    y = np.asarray(labels).astype(float)

    def nll(log_t: float) -> float:
        p = np.clip(sigmoid(logits / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    for _ in range(80):
        if nll(a) < nll(b):
            high = b
        else:
            low = a
        a, b = high - ratio * (high - low), low + ratio * (high - low)
    return float(np.exp((low + high) / 2))


def screening_threshold(
    labels: np.ndarray, p_pneumonia: np.ndarray, min_sensitivity: float = 0.97
) -> float:
    """Highest threshold whose pneumonia sensitivity is still >= min_sensitivity.

    The highest such threshold gives the best specificity that the sensitivity floor allows.
    """
    positives = np.sort(np.asarray(p_pneumonia)[np.asarray(labels) == 1])
    if positives.size == 0:
        return 0.5
    allowed_misses = int(np.floor((1.0 - min_sensitivity) * positives.size))
    return float(positives[allowed_misses])


def classification_report(
    labels: np.ndarray, p_pneumonia: np.ndarray, threshold: float
) -> dict[str, object]:
    labels = np.asarray(labels).astype(int)
    predicted = (np.asarray(p_pneumonia) >= threshold).astype(int)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    n = len(labels)
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * precision * sensitivity / (precision + sensitivity) if tp else 0.0
    return {
        "n": n,
        "threshold": round(float(threshold), 6),
        "accuracy": round((tp + tn) / n, 4) if n else float("nan"),
        "auc": round(roc_auc(labels, p_pneumonia), 4),
        "sensitivity": round(sensitivity, 4),
        "specificity": round(specificity, 4),
        "precision": round(precision, 4),
        "f1": round(f1, 4),
        "ece": round(ece(labels, p_pneumonia), 4),
        "confusion_matrix": {
            "rows_true_cols_predicted": ["NORMAL", "PNEUMONIA"],
            "matrix": [[tn, fp], [fn, tp]],
        },
    }


def selection_score(reports: Iterable[Mapping]) -> tuple[float, float, float]:
    """The rule for choosing between versions (docs/experiments/selection_rule.txt), from one
    classification report per validation condition (clean + the fixed perturbations): mean
    balanced accuracy ((sensitivity + specificity) / 2), then mean AUC for ties, and the worst
    specificity, which the model card reports beside them."""
    rows = list(reports)
    if not rows:
        raise ValueError("selection_score needs at least one condition's report")
    balanced = statistics.mean((r["sensitivity"] + r["specificity"]) / 2 for r in rows)
    return balanced, statistics.mean(r["auc"] for r in rows), min(r["specificity"] for r in rows)
