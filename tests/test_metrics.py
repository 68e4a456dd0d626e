"""Episode scores on hand-checkable cases, and the interval over episodes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, jaccard_score

from models.metrics import (
    accuracy,
    cohen_kappa,
    confusion_matrix,
    episode_scores,
    macro_f1,
    mean_ci,
    mean_iou,
)


def test_perfect_prediction_scores_one():
    truth = np.array([[0, 1, 2], [2, 1, 0]])
    scores = episode_scores(truth, truth, 3, segmentation=True)
    assert scores == {"accuracy": 1.0, "kappa": 1.0, "macro_f1": 1.0, "miou": 1.0}
    assert "miou" not in episode_scores(truth.ravel(), truth.ravel(), 3, segmentation=False)


def test_a_single_class_agreed_everywhere_is_perfect_agreement():
    truth = np.zeros(5, dtype=np.int64)
    assert cohen_kappa(confusion_matrix(truth, truth, 2)) == 1.0


def test_known_confusion_matrix():
    # 50 items: true 0 -> 20 right, 5 wrong; true 1 -> 10 wrong, 15 right.
    truth = np.array([0] * 25 + [1] * 25)
    predicted = np.array([0] * 20 + [1] * 5 + [0] * 10 + [1] * 15)
    matrix = confusion_matrix(truth, predicted, 2)
    assert matrix.tolist() == [[20, 5], [10, 15]]
    assert accuracy(matrix) == pytest.approx(0.7)
    # p_o = 0.7, p_e = (25 * 30 + 25 * 20) / 50**2 = 0.5
    assert cohen_kappa(matrix) == pytest.approx(0.4)
    # F1: 40 / 55 and 30 / 45; IoU: 20 / 35 and 15 / 30
    assert macro_f1(matrix) == pytest.approx((40 / 55 + 30 / 45) / 2)
    assert mean_iou(matrix) == pytest.approx((20 / 35 + 15 / 30) / 2)


def test_ignored_pixels_do_not_count():
    truth = np.array([0, 1, 255, 255])
    predicted = np.array([0, 1, 1, 0])
    assert confusion_matrix(truth, predicted, 2).sum() == 2
    assert episode_scores(truth, predicted, 2, segmentation=True)["miou"] == 1.0


def test_agrees_with_scikit_learn_on_random_labels():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    matrix = confusion_matrix(truth, predicted, 4)
    assert cohen_kappa(matrix) == pytest.approx(cohen_kappa_score(truth, predicted))
    assert macro_f1(matrix) == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert mean_iou(matrix) == pytest.approx(jaccard_score(truth, predicted, average="macro"))


def test_classes_absent_from_truth_and_prediction_are_not_averaged_in():
    truth, predicted = np.array([0, 0, 2]), np.array([0, 0, 2])
    assert macro_f1(confusion_matrix(truth, predicted, 4)) == 1.0


def test_mean_ci_is_a_student_t_interval():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # t(0.975, 4) = 2.7764, sd = sqrt(2.5), half width = 2.7764 * sqrt(2.5) / sqrt(5)
    assert mean == 3.0
    assert high - mean == pytest.approx(2.7764 * np.sqrt(2.5 / 5), rel=1e-4)
    assert mean - low == pytest.approx(high - mean)
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    single = mean_ci([0.7])
    assert single[0] == 0.7 and np.isnan(single[1]) and np.isnan(single[2])
    with pytest.raises(ValueError):
        mean_ci([])
