"""Adaptation candidates: every way `landcover` turns a few labelled pixels into a classifier,
behind one small interface, so evaluation, cross-validation on a user's labels and mapping treat
them alike.

- `FinetuneCandidate`: a trained network fine-tuned by full-batch SGD (`models.finetune`), at the
  budget its run picked on validation.
- `HeadCandidate`: the same network frozen, a closed-form head fitted on its per-pixel features
  (embedding + standardised bands, `models.heads`): a ridge head for runs meta-trained through one
  (R2-D2), a logistic head otherwise. No step budget.
- `PrototypeCandidate`: the frozen network's nearest class prototype on the same features
  (prototypical networks). No step budget.
- `PixelCandidate`: the classical baseline that GIS plugins offer, a logistic regression on each
  pixel's band values (per-band mean and standard deviation of a tile, for classification).

A candidate fits on a `Support` and gives a `Predictor`: images -> probabilities over the support's
classes, (B, N, H, W) for windows or (B, N) for tiles.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from geo.classes import IGNORE_INDEX
from models.backbones import last_layer_names
from models.checkpoint import LoadedRun
from models.finetune import finetune, predict
from models.heads import features_numpy, labelled_rows, ridge_fit
from models.learner import FINETUNE_ADAPTATIONS
from models.learners import LEARNERS
from models.maml import Schedule
from models.protonet import prototype_head, prototypes

Predictor = Callable[[np.ndarray], np.ndarray]
PIXEL = "pixel"
"""The name of the classical candidate on the command line and in reports."""
LOGISTIC_C = 1.0
"""Inverse L2 strength of the logistic heads: scikit-learn's default on z-scored features, i.e.
what a GIS plugin's logistic regression does, so the classical baseline is not tuned here."""


@dataclass(frozen=True)
class Support:
    """Labelled windows (labels (B, H, W)) or tiles (labels (B,)): 0..N-1 in the order of
    `classes` (global ids), IGNORE_INDEX where unlabelled."""

    images: np.ndarray
    labels: np.ndarray
    classes: np.ndarray

    @property
    def labelled(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class Candidate(Protocol):
    # Read-only properties, so that frozen dataclasses match.
    @property
    def name(self) -> str: ...

    @property
    def fits_on_context(self) -> bool:
        """True: fit on windows of the prediction size (features depend on a window's context); False:
        on small windows cut around the labels, as fine-tuning was meta-trained."""
        ...

    def fit(self, support: Support) -> Predictor: ...

    def describe(self) -> dict[str, Any]: ...


def uniform(support: Support) -> Predictor:
    """What a candidate without any label predicts: every class equally likely, per pixel of a
    window (segmentation) or per tile (classification: labels (B,))."""
    count, per_tile = len(support.classes), support.labels.ndim == 1

    def scores(images: np.ndarray) -> np.ndarray:
        shape = (len(images), count) if per_tile else (len(images), count, *images.shape[2:])
        return np.full(shape, 1.0 / count, dtype=np.float32)

    return scores


@dataclass(frozen=True)
class FinetuneCandidate:
    """A network fine-tuned on the support's labelled pixels at its run's budget."""

    name: str
    model: nn.Module
    steps: int
    lr: Schedule
    seed: int = 0
    source: str = ""
    """The run directory the network comes from (to save an adapted copy)."""
    only: Collection[str] | None = None
    """The parameters fine-tuning changes (ANIL: the last layer's); None: all."""
    fits_on_context: bool = False

    def fit(self, support: Support) -> Tuned:
        tuned = finetune(
            self.model,
            support.images,
            support.labels,
            support.classes,
            steps=self.steps,
            lr=self.lr,
            seed=self.seed,
            only=self.only,
        )
        return Tuned(tuned, support.classes)

    def describe(self) -> dict[str, Any]:
        rate: Any = self.lr
        if isinstance(self.lr, Mapping):
            rate = "learned rates"
        elif isinstance(self.lr, Sequence):
            rate = "learned per-step rates"
        what = "fine-tuned" if self.only is None else "last layer fine-tuned"
        return {"kind": what, "steps": self.steps, "lr": rate}


@dataclass(frozen=True)
class Tuned:
    """A fine-tuned network as a predictor (kept whole, so an adapted run can be saved)."""

    model: nn.Module
    classes: np.ndarray

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return predict(self.model, images, self.classes)


@dataclass(frozen=True)
class LinearScores:
    """A fitted linear head as a predictor: softmax(((x - mean) / scale) @ weights + bias) over
    the classes it saw (`columns` of the support's classes; the others get 0). `featurize` turns
    images into per-pixel or per-tile features. Plain arrays, so an adapted head can be saved."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    columns: np.ndarray
    count: int
    featurize: Callable[[np.ndarray], np.ndarray]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        new = self.featurize(images)
        flat = np.moveaxis(new, 1, -1).reshape(-1, new.shape[1]) if new.ndim == 4 else new
        logits = ((flat - self.mean) / self.scale) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        chosen = np.exp(logits)
        probabilities = np.zeros((len(flat), self.count), dtype=np.float32)
        probabilities[:, self.columns] = chosen / chosen.sum(axis=1, keepdims=True)
        if new.ndim == 4:
            batch, _, height, width = new.shape
            return np.moveaxis(probabilities.reshape(batch, height, width, self.count), -1, 1)
        return probabilities

    def state(self) -> dict[str, torch.Tensor]:
        """The head's arrays as tensors (saved with `torch.save`, loaded with weights_only)."""
        names = ("mean", "scale", "weights", "bias", "columns")
        return {name: torch.from_numpy(np.asarray(getattr(self, name))) for name in names}

    @classmethod
    def from_state(
        cls, state: Mapping[str, torch.Tensor], count: int, featurize: Callable[[np.ndarray], np.ndarray]
    ) -> LinearScores:
        arrays = {name: value.numpy() for name, value in state.items()}
        return cls(**arrays, count=count, featurize=featurize)


@dataclass(frozen=True)
class HeadCandidate:
    """A frozen network with a closed-form head on its per-pixel features."""

    name: str
    model: nn.Module
    ridge_penalty: float | None = None
    """Set for runs meta-trained through a ridge head: that head, at the learned penalty."""
    ridge_scale: float = 1.0
    source: str = ""
    fits_on_context: bool = True

    def featurize(self, images: np.ndarray) -> np.ndarray:
        return features_numpy(self.model, images)

    def fit(self, support: Support) -> Predictor:
        if support.labelled == 0:
            return uniform(support)
        values = self.featurize(support.images)
        if self.ridge_penalty is None:
            return fit_logistic(values, support.labels, len(support.classes), self.featurize)
        rows, labels = labelled_rows(torch.from_numpy(values), torch.from_numpy(support.labels).long())
        head = ridge_fit(rows, labels, len(support.classes), self.ridge_penalty)
        return LinearScores(
            mean=head.mean.squeeze(0).numpy(),
            scale=head.scale.squeeze(0).numpy(),
            weights=head.weights.numpy() * self.ridge_scale,
            bias=head.bias.numpy() * self.ridge_scale,
            columns=np.arange(len(support.classes)),
            count=len(support.classes),
            featurize=self.featurize,
        )

    def describe(self) -> dict[str, Any]:
        if self.ridge_penalty is not None:
            return {"kind": "closed-form ridge head", "penalty": self.ridge_penalty}
        return {"kind": "closed-form logistic head", "C": LOGISTIC_C}


@dataclass(frozen=True)
class PrototypeCandidate:
    """A frozen network scoring each pixel by its distance to the classes' mean features."""

    name: str
    model: nn.Module
    source: str = ""
    fits_on_context: bool = True

    def featurize(self, images: np.ndarray) -> np.ndarray:
        return features_numpy(self.model, images)

    def fit(self, support: Support) -> Predictor:
        if support.labelled == 0:
            return uniform(support)
        values = self.featurize(support.images)
        rows, labels = labelled_rows(torch.from_numpy(values), torch.from_numpy(support.labels).long())
        means, present = prototypes(rows, labels, len(support.classes))
        weights, bias = prototype_head(means[present])
        width = values.shape[1]
        return LinearScores(
            mean=np.zeros(width),
            scale=np.ones(width),
            weights=weights.numpy(),
            bias=bias.numpy(),
            columns=np.flatnonzero(present.numpy()),
            count=len(support.classes),
            featurize=self.featurize,
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": "nearest class prototype (mean features of the labels)"}


@dataclass(frozen=True)
class PixelCandidate:
    """Logistic regression on band values: the classical baseline every network must beat."""

    name: str = PIXEL
    fits_on_context: bool = True

    def fit(self, support: Support) -> Predictor:
        if support.labelled == 0:
            return uniform(support)
        per_tile = support.labels.ndim == 1
        return fit_logistic(
            band_values(support.images, per_tile),
            support.labels,
            len(support.classes),
            lambda images: band_values(images, per_tile),
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": "per-pixel logistic regression on the bands", "C": LOGISTIC_C}


def band_values(images: np.ndarray, per_tile: bool) -> np.ndarray:
    """The pixels' bands (B, C, H, W) as they are, or each tile's per-band mean and std (B, 2C)."""
    if per_tile:
        return np.concatenate([images.mean(axis=(2, 3)), images.std(axis=(2, 3))], axis=1)
    return images


def fit_logistic(
    values: np.ndarray, labels: np.ndarray, count: int, featurize: Callable[[np.ndarray], np.ndarray]
) -> LinearScores:
    """scikit-learn's logistic regression on the z-scored labelled rows of `values` (features
    (B, F, H, W) with labels (B, H, W), or (B, F) with (B,)), as a `LinearScores`."""
    rows_t, targets_t = labelled_rows(torch.from_numpy(values), torch.from_numpy(labels.astype(np.int64)))
    rows, targets = rows_t.numpy().astype(np.float64), targets_t.numpy()
    present = np.unique(targets)
    mean, scale = rows.mean(axis=0), rows.std(axis=0)
    scale[scale < 1e-12] = 1.0
    if len(present) == 1:
        weights, bias = np.zeros((rows.shape[1], 1)), np.zeros(1)
    else:
        model = LogisticRegression(C=LOGISTIC_C, max_iter=2000).fit((rows - mean) / scale, targets)
        weights, bias = model.coef_.T, model.intercept_
        if len(present) == 2:  # scikit-learn's binary model: sigmoid(z) == softmax([-z/2, z/2])
            weights, bias = np.hstack([-weights / 2, weights / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    return LinearScores(mean, scale, weights, bias, present, count, featurize)


def run_candidates(run: LoadedRun, name: str, *, source: str = "", seed: int = 0) -> list[Candidate]:
    """A trained run's variants, its learner's own adaptation first: fine-tuned at its picked
    budget (every weight, or the last layer for ANIL), or its prototypes (ProtoNet), or its ridge
    head (R2-D2); then a closed-form head on its features, unless the own adaptation is a head.
    An R2-D2 run is only its head: its last layer is a stale copy of the weights it started from,
    which fine-tuning would start from too."""
    config = run.config
    learner = LEARNERS.get(config.method.removesuffix(" adapted"))
    if learner is None:
        raise ValueError(f"method {config.method!r} is none of {', '.join(LEARNERS)}")
    candidates: list[Candidate] = []
    if learner.adaptation in FINETUNE_ADAPTATIONS and config.finetune_steps is not None:
        lr = config.finetune_lr if config.finetune_lr is not None else learner.test_rates(run.inner_lrs)
        if lr is None:
            raise ValueError("the run has neither a fine-tuning rate nor learned inner rates")
        only = last_layer_names(run.model) if learner.adaptation == "finetune-head" else None
        candidates.append(
            FinetuneCandidate(
                f"{name} fine-tuned",
                run.model,
                config.finetune_steps,
                lr,
                seed,
                source,
                only,
            )
        )
    if learner.adaptation == "prototypes":
        candidates.append(PrototypeCandidate(f"{name} prototypes", run.model, source=source))
    candidates.append(
        HeadCandidate(
            f"{name} head",
            run.model,
            ridge_penalty=config.head_penalty,
            ridge_scale=config.head_scale or 1.0,
            source=source,
        )
    )
    return candidates
