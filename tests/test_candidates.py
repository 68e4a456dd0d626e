"""Closed-form heads, the per-pixel classifier, and spatially blocked cross-validation.

Small arrays built here with known answers: what each piece must compute, not a race between
methods (those are in benchmarks/adapt_scenes.py).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from models.backbones import Standardized, arch_preset, build_model
from models.heads import CONTEXT_SIZES, features, labelled_rows, ridge_fit
from pipeline.candidates import LinearScores, PixelCandidate, Support, fit_logistic
from pipeline.crossval import LabelledScene, cross_validate, spatial_folds, wilson_interval


def _two_class_windows(seed: int, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Two 3-band windows of 16 px: left half class 0 (brighter in every band), right half class 1."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.2, noise, (2, 3, 16, 16)).astype(np.float32)
    images[:, :, :, :8] += 0.3
    truth = np.zeros((2, 16, 16), dtype=np.int64)
    truth[:, :, 8:] = 1
    return images, truth


def test_ridge_primal_and_dual_solutions_agree_and_are_differentiable():
    """Fewer rows than features solves the n x n (Woodbury) system; more rows the F x F one:
    the same minimiser either way, and the penalty gets a gradient through the solve."""
    torch.manual_seed(0)
    values, labels = torch.randn(12, 5), torch.arange(12) % 3
    penalty = torch.tensor(0.7, requires_grad=True)
    wide = ridge_fit(torch.cat([values, values], dim=1), labels, 3, penalty)  # 12 rows, 10 features
    narrow = ridge_fit(values, labels, 3, penalty)  # 12 rows, 5 features
    centred = (values - narrow.mean) / narrow.scale
    targets = torch.nn.functional.one_hot(labels, 3).float() - narrow.bias
    expected = torch.linalg.solve(centred.T @ centred + 0.7 * torch.eye(5), centred.T @ targets)
    torch.testing.assert_close(narrow.weights, expected, rtol=1e-4, atol=1e-5)
    assert wide.weights.shape == (10, 3)
    narrow.logits(values).sum().backward()
    assert penalty.grad is not None and penalty.grad.abs() > 0


def test_features_are_the_embedding_then_the_bands_then_their_neighbourhood_means():
    import dataclasses

    arch = dataclasses.replace(
        arch_preset("tiny", "segmentation", 3, 4), input_mean=(0.1, 0.2, 0.3), input_std=(0.5, 0.5, 0.5)
    )
    model = build_model(arch, seed=0).eval()
    assert isinstance(model, Standardized)
    images = torch.rand(2, 3, 16, 16)
    values = features(model, images)
    embedding_width = values.shape[1] - 3 * (1 + len(CONTEXT_SIZES))
    assert values.shape == (2, embedding_width + 9, 16, 16) and embedding_width > 0
    bands = (images - model.mean) / model.std
    torch.testing.assert_close(values[:, embedding_width : embedding_width + 3], bands)
    # an interior pixel's 3 x 3 and 5 x 5 means, and a corner's 3 x 3 mean over the 4 pixels it has
    torch.testing.assert_close(
        values[0, embedding_width + 3 : embedding_width + 6, 7, 9], bands[0, :, 6:9, 8:11].mean(dim=(1, 2))
    )
    torch.testing.assert_close(values[0, embedding_width + 6 :, 7, 9], bands[0, :, 5:10, 7:12].mean(dim=(1, 2)))
    torch.testing.assert_close(
        values[1, embedding_width + 3 : embedding_width + 6, 0, 0], bands[1, :, :2, :2].mean(dim=(1, 2))
    )
    labels = torch.full((2, 16, 16), 255)
    labels[0, 3, 5] = 2
    rows, kept = labelled_rows(values, labels)
    assert rows.shape == (1, embedding_width + 9) and kept.tolist() == [2]
    torch.testing.assert_close(rows[0], values[0, :, 3, 5])


def test_logistic_head_matches_scikit_learn_and_survives_a_save():
    """The linear form used for mapping and saving gives scikit-learn's own probabilities,
    for two classes (sigmoid) and more (softmax)."""
    rng = np.random.default_rng(1)
    for count in (2, 4):
        values = rng.normal(size=(40, 5)).astype(np.float32)
        labels = np.arange(40) % count
        head = fit_logistic(values, labels, count, lambda x: x)
        mean, scale = values.astype(np.float64).mean(0), values.astype(np.float64).std(0)
        reference = LogisticRegression(max_iter=2000).fit((values - mean) / scale, labels)
        new = rng.normal(size=(7, 5)).astype(np.float32)
        np.testing.assert_allclose(head(new), reference.predict_proba((new - mean) / scale), atol=1e-5)
        restored = LinearScores.from_state(head.state(), count, lambda x: x)
        np.testing.assert_allclose(restored(new), head(new), atol=1e-7)


def test_pixel_candidate_separates_what_the_bands_separate_and_keeps_unlabelled_classes_at_zero():
    images, truth = _two_class_windows(0)
    labels = np.full_like(truth, 255)
    labels[0, 2, 2], labels[0, 10, 3], labels[1, 5, 12], labels[1, 12, 14] = 0, 0, 1, 1
    predictor = PixelCandidate().fit(Support(images, labels, np.array([3, 7, 9])))
    probabilities = predictor(images)
    assert probabilities.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == truth).mean() > 0.95
    assert probabilities[:, 2].max() == 0.0  # class 9 has no label: never predicted


def test_spatial_folds_keep_blocks_together_and_spread_every_class():
    """Pairs of labels 5 px apart in one 20 px block, pairs 100 px apart: each pair shares a fold;
    a class's pairs are dealt to different folds so every class can be held out."""
    labels = [(100 * pair + offset, 0, pair % 2) for pair in range(10) for offset in (0, 5)]
    rows, cols, targets = (np.array(column) for column in zip(*labels))
    folds = spatial_folds(rows, cols, targets, spacing=20, folds=5)
    assert len(np.unique(folds)) == 5
    assert all(folds[2 * pair] == folds[2 * pair + 1] for pair in range(10))
    for fold in range(5):
        assert set(targets[folds == fold]) == {0, 1}


def _scene(images: np.ndarray, points: list[tuple[int, int, int]], truth: np.ndarray) -> LabelledScene:
    at = np.array(points)
    return LabelledScene(
        classes=np.array([2, 5]),
        targets=truth[at[:, 0], at[:, 1], at[:, 2]],
        rows=at[:, 0] * 1000 + at[:, 1],
        cols=at[:, 2],
        support_images=images,
        support_at=at,
        context_images=images,
        context_at=at,
    )


def test_cross_validation_scores_held_out_labels_and_names_classes_it_cannot_hold_out():
    images, truth = _two_class_windows(2)
    spread = [(w, r, c) for w in (0, 1) for r, c in ((1, 1), (14, 2), (1, 13), (14, 14))]
    result = cross_validate([PixelCandidate()], _scene(images, spread, truth), spacing=3, folds=4)
    (estimate,) = result.estimates
    assert estimate.scored == 8 and estimate.accuracy == 1.0 and not result.unscored
    assert estimate.low < 1.0 and estimate.confusion == [[4, 0], [0, 4]]
    # class 5's labels all touch each other (across block edges too): the buffer leaves no class-5
    # label to train on when one is held out, so class 5 is never scored; class 2 still is
    clumped = [(0, 1, 1), (0, 14, 2), (1, 1, 1), (1, 14, 2), (0, 5, 12), (0, 5, 13), (0, 6, 12), (0, 6, 13)]
    result = cross_validate([PixelCandidate()], _scene(images, clumped, truth), spacing=3, folds=4)
    assert list(result.unscored) == [5] and result.estimates[0].scored == 4


def test_wilson_interval_covers_the_share_and_stays_inside_zero_and_one():
    low, high = wilson_interval(25, 25)
    assert 0.8 < low < 1.0 and high == 1.0 and wilson_interval(0, 25)[0] == 0.0
    low, high = wilson_interval(12, 24)
    assert low < 0.5 < high and high - low < 0.45


def test_no_training_label_lies_within_the_spacing_of_a_held_out_label():
    """Labels every 6 px along a row, spacing 10: each fold trains only on labels more than 10 px
    from every label it holds out, whatever block they fell in."""
    images, truth = _two_class_windows(3)
    points = [(w, r, c) for w in (0, 1) for r in (2, 13) for c in range(1, 16, 6)]
    scene = _scene(images, points, truth)
    seen: list[np.ndarray] = []

    class Recording(PixelCandidate):
        def fit(self, support: Support):
            seen.append(np.argwhere(support.labels != 255))
            return super().fit(support)

    result = cross_validate([Recording()], scene, spacing=10, folds=3)
    at = scene.context_at
    position = {tuple(p): i for i, p in enumerate(at.tolist())}
    for fold, trained in zip(np.unique(result.folds), seen):
        held = np.flatnonzero(result.folds == fold)
        for window, row, col in trained:
            label = position[(window, row, col)]
            gaps = np.hypot(scene.rows[held] - scene.rows[label], scene.cols[held] - scene.cols[label])
            assert label not in held and gaps.min() > 10
