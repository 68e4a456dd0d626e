"""Spatially blocked cross-validation on a user's own labels: which candidate maps this scene
best, and how accurate its map is likely to be.

Labels that lie close together see the same object (field, stand, block), so a random split would
score a candidate on near-copies of its training pixels and flatter it. Labels are grouped in
square blocks of `spacing` pixels, blocks are dealt to folds so that each fold holds a share of
every class, and when a fold is held out, every label within `spacing` pixels of it is left out
of training too (a buffer, as in spatial leave-one-out): neighbouring labels are never on both
sides. (Grouping by single linkage instead chains dense labels into one group and leaves nothing
to hold out.) A held-out label counts only when its class keeps training labels; a class whose
labels all lie within `spacing` of each other cannot be held out, and the report says so.

Every candidate is fitted and scored on the same folds; its estimate is the accuracy over all
held-out labels with a 95% Wilson interval, its per-class recall and its confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from geo.classes import IGNORE_INDEX
from geo.progress import progress_bar
from pipeline.candidates import PIXEL, Candidate, Support

DEFAULT_FOLDS = 5
DEFAULT_SPACING = 32
"""Pixels: labels closer than this share a fold (about one object of a 10 m scene across)."""


@dataclass(frozen=True)
class LabelledScene:
    """A scene's labelled pixels, cut two ways: small support windows around the labels (what
    fine-tuning was meta-trained on) and windows of the prediction size (what the map sees).

    `support_at` / `context_at`: (n, 3) window, row, column of each label in those windows.
    """

    classes: np.ndarray
    targets: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    support_images: np.ndarray
    support_at: np.ndarray
    context_images: np.ndarray
    context_at: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def support(self, keep: np.ndarray, *, context: bool) -> Support:
        """The kept labels on the support (or context) windows, the rest unlabelled."""
        images, at = (self.context_images, self.context_at) if context else (self.support_images, self.support_at)
        labels = np.full((len(images), *images.shape[2:]), IGNORE_INDEX, dtype=np.int64)
        labels[at[keep, 0], at[keep, 1], at[keep, 2]] = self.targets[keep]
        return Support(images, labels, self.classes)

    def probabilities_at(self, scores: np.ndarray) -> np.ndarray:
        """(n, N) class probabilities at every label, from scores of the context windows."""
        return np.moveaxis(scores, 1, -1)[self.context_at[:, 0], self.context_at[:, 1], self.context_at[:, 2]]


def spatial_folds(rows: np.ndarray, cols: np.ndarray, targets: np.ndarray, *, spacing: float, folds: int) -> np.ndarray:
    """Fold id of each label: blocks of `spacing` pixels dealt, largest first, to the fold where
    they least pile up one class."""
    count = len(rows)
    if count < 2:
        return np.zeros(count, dtype=np.int64)
    side = max(float(spacing), 1.0)
    cells = np.column_stack([rows // side, cols // side]).astype(np.int64)
    groups = np.unique(cells, axis=0, return_inverse=True)[1].reshape(-1)
    folds = max(1, min(folds, int(groups.max()) + 1))
    classes = int(targets.max()) + 1
    per_fold = np.zeros((folds, classes))
    order = sorted(range(int(groups.max()) + 1), key=lambda g: (-int((groups == g).sum()), g))
    fold_of_group = {}
    for group in order:
        counts = np.bincount(targets[groups == group], minlength=classes)
        cost = ((per_fold + counts) ** 2).sum(axis=1) + 1e-3 * per_fold.sum(axis=1)
        fold_of_group[group] = int(np.argmin(cost))
        per_fold[fold_of_group[group]] += counts
    return np.array([fold_of_group[g] for g in groups.tolist()], dtype=np.int64)


@dataclass(frozen=True)
class Estimate:
    """A candidate's cross-validated scores on the held-out labels."""

    name: str
    description: dict
    accuracy: float
    low: float
    high: float
    scored: int
    log_likelihood: float
    recall: dict[int, float]
    confusion: list[list[int]]

    def key(self) -> tuple[float, bool, float]:
        """Best first: accuracy; on a tie the classical pixel classifier (a network counts only
        where it beats it), then how much probability the held-out truth got."""
        return (self.accuracy, self.name == PIXEL, self.log_likelihood)


@dataclass(frozen=True)
class CrossValidation:
    """The folds and every candidate's estimate; `unscored` maps a class id to why it was not held out."""

    folds: np.ndarray
    spacing: float
    estimates: list[Estimate]
    unscored: dict[int, str] = field(default_factory=dict)

    def best(self) -> Estimate | None:
        """The candidate of highest estimate (earlier candidates win ties); None if none was scored."""
        scored = [estimate for estimate in self.estimates if estimate.scored]
        return max(scored, key=Estimate.key) if scored else None


def wilson_interval(hits: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sane at 0 or all hits and with few labels."""
    if total == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf((1 + confidence) / 2))
    share = hits / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    low = 0.0 if hits == 0 else max(0.0, float(centre - half))
    high = 1.0 if hits == total else min(1.0, float(centre + half))
    return low, high


def cross_validate(
    candidates: Sequence[Candidate],
    scene: LabelledScene,
    *,
    spacing: float = DEFAULT_SPACING,
    folds: int = DEFAULT_FOLDS,
    progress: bool = False,
) -> CrossValidation:
    """Fit every candidate on each fold's complement, predict the fold's labels, score them all;
    `progress` shows a bar over the fits, naming the candidate."""
    fold_of = spatial_folds(scene.rows, scene.cols, scene.targets, spacing=spacing, folds=folds)
    count = len(scene.classes)
    points = np.column_stack([scene.rows, scene.cols]).astype(np.float64)
    distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(axis=-1))
    scored = np.zeros(len(scene), dtype=bool)
    training_of = {}
    for fold in np.unique(fold_of):
        held = fold_of == fold
        training = ~held & (distance[held].min(axis=0) > spacing)
        training_of[fold] = training
        scored |= held & np.isin(scene.targets, np.unique(scene.targets[training]))
    unscored = {
        int(scene.classes[label]): f"its labels lie within {spacing:g} px of each other: none can be held out"
        for label in range(count)
        if not scored[scene.targets == label].any()
    }
    fitted = [fold for fold in np.unique(fold_of) if ((fold_of == fold) & scored).any()]
    estimates = []
    with progress_bar(len(candidates) * len(fitted), "cross-validate", unit="fits", enabled=progress) as bar:
        for candidate in candidates:
            bar.set_postfix_str(candidate.name, refresh=False)
            probabilities = np.zeros((len(scene), count), dtype=np.float64)
            for fold in fitted:
                held = (fold_of == fold) & scored
                predictor = candidate.fit(scene.support(training_of[fold], context=candidate.fits_on_context))
                probabilities[held] = scene.probabilities_at(predictor(scene.context_images))[held]
                bar.update()
            estimates.append(_estimate(candidate, scene, probabilities, scored))
    return CrossValidation(fold_of, spacing, estimates, unscored)


def _estimate(candidate: Candidate, scene: LabelledScene, probabilities: np.ndarray, scored: np.ndarray) -> Estimate:
    count = len(scene.classes)
    truth, predicted = scene.targets[scored], probabilities[scored].argmax(axis=1)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    hits, total = int(np.trace(confusion)), int(scored.sum())
    low, high = wilson_interval(hits, total)
    truth_probability = probabilities[scored, truth] if total else np.zeros(0)
    recall = {
        int(scene.classes[label]): float(confusion[label, label] / confusion[label].sum())
        for label in range(count)
        if confusion[label].sum()
    }
    return Estimate(
        name=candidate.name,
        description=candidate.describe(),
        accuracy=hits / total if total else float("nan"),
        low=low,
        high=high,
        scored=total,
        log_likelihood=float(np.log(np.clip(truth_probability, 1e-6, None)).mean()) if total else float("-inf"),
        recall=recall,
        confusion=confusion.tolist(),
    )
