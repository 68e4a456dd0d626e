"""Episode scores (accuracy, Cohen's kappa, macro-F1, mIoU) and their 95% interval over episodes.

All scores come from one confusion matrix over labelled items (IGNORE_INDEX dropped), so they
agree with each other. Macro-F1 and mIoU average over the classes present in the truth or the
prediction: a segmentation query tile that lacks a class is not scored 0 for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from models.backbones import IGNORE_INDEX


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(true, predicted) counts over items whose true label is not IGNORE_INDEX."""
    truth, predicted = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    keep = truth != IGNORE_INDEX
    flat = truth[keep].astype(np.int64) * num_classes + predicted[keep].astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(matrix: np.ndarray) -> float:
    return float(np.trace(matrix) / max(matrix.sum(), 1))


def cohen_kappa(matrix: np.ndarray) -> float:
    """(p_o - p_e) / (1 - p_e); 1.0 when chance agreement is already total (one class only)."""
    total = max(matrix.sum(), 1)
    observed = np.trace(matrix) / total
    expected = float(matrix.sum(axis=0) @ matrix.sum(axis=1)) / total**2
    return 1.0 if expected == 1.0 else float((observed - expected) / (1.0 - expected))


def _present(matrix: np.ndarray) -> np.ndarray:
    return (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0


def macro_f1(matrix: np.ndarray) -> float:
    """Mean F1 = 2TP / (2TP + FP + FN) over classes present in truth or prediction."""
    hits = np.diag(matrix)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)
    present = _present(matrix)
    return float(np.mean(2 * hits[present] / denominator[present])) if present.any() else 0.0


def mean_iou(matrix: np.ndarray) -> float:
    """Mean IoU = TP / (TP + FP + FN) over classes present in truth or prediction."""
    hits = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - hits
    present = _present(matrix)
    return float(np.mean(hits[present] / union[present])) if present.any() else 0.0


def episode_scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, *, segmentation: bool) -> dict[str, float]:
    """The report's scores of one episode: accuracy, kappa, macro_f1 (+ miou for segmentation)."""
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    scores = {
        "accuracy": accuracy(matrix),
        "kappa": cohen_kappa(matrix),
        "macro_f1": macro_f1(matrix),
    }
    if segmentation:
        scores["miou"] = mean_iou(matrix)
    return scores


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over episodes; NaN bounds for 1 value."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("mean_ci of no values")
    mean = float(data.mean())
    if data.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + confidence) / 2, data.size - 1) * data.std(ddof=1) / np.sqrt(data.size)
    return mean, float(mean - half), float(mean + half)
