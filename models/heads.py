"""Closed-form heads: a classifier fitted in one solve on features of the labelled pixels (or
tiles), instead of fine-tuning the network by SGD.

Why: test-time fine-tuning hinges on a step budget picked on validation episodes, and a budget
that suits those episodes need not suit a user's scene. A head fitted in closed form has no step
budget: it is the optimum of a convex problem on the labels given.

Features of a pixel are the network's embedding there (the input of its last layer: the U-Net's
decoder output, or a classifier's pooled features), the standardised band values, and their means
over the pixel's 3 x 3 and 5 x 5 neighbourhoods. So a head never knows less than a per-pixel
classifier on the bands, and gains what the embedding adds (learned invariances) and what a
neighbourhood says that one pixel cannot (sensor noise and mixed pixels average out over an object
tens of pixels wide). The neighbourhood means are the classical contextual features of remote
sensing; a network learns them too, but a small one trained for minutes on a CPU does so poorly:
on the generator's hard scenes they lift a head from 0.74 to 0.83 mean accuracy
(BENCHMARKS.md). For classification the band part is each tile's per-band mean and standard
deviation.

`ridge_fit` / `ridge_logits` are differentiable (`torch.linalg.solve`), so an embedding can be
meta-trained *through* the head (R2-D2, Bertinetto et al. 2019; `models.r2d2`), and the head
fitted on a few pixels then generalises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import IGNORE_INDEX, Standardized, last_layer
from models.device import as_images, autocast, model_device

FEATURE_EPSILON = 1e-6
CONTEXT_SIZES = (3, 5)
"""Sides of the neighbourhoods whose band means join a pixel's features."""


def standardised_bands(model: nn.Module, images: Tensor) -> Tensor:
    """The bands as the network sees them (its training split's statistics), or as they are."""
    if isinstance(model, Standardized):
        return (images - model.mean) / model.std
    return images


def features(model: nn.Module, images: Tensor) -> Tensor:
    """Per-pixel (B, F, H, W) or per-tile (B, F) features: embedding, then standardised bands.

    Differentiable with respect to the model's parameters (no `no_grad` inside).
    """
    captured: list[Tensor] = []
    hook = last_layer(model).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        model(images)
    finally:
        hook.remove()
    embedding = captured[0].float()
    bands = standardised_bands(model, images).float()
    if embedding.ndim == 4:
        means = [
            F.avg_pool2d(bands, size, stride=1, padding=size // 2, count_include_pad=False) for size in CONTEXT_SIZES
        ]
        return torch.cat([embedding, bands, *means], dim=1)
    return torch.cat([embedding, bands.mean(dim=(2, 3)), bands.std(dim=(2, 3))], dim=1)


@torch.no_grad()
def features_numpy(model: nn.Module, images: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    """`features` of numpy images in batches, as float32 numpy (for scikit-learn heads)."""
    model.eval()
    device = model_device(model)
    parts = []
    for start in range(0, len(images), batch_size):
        with autocast(device):
            parts.append(features(model, as_images(model, images[start : start + batch_size])).cpu().numpy())
    return np.concatenate(parts).astype(np.float32)


def labelled_rows(values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(n, F) features and (n,) labels of the labelled items: pixels of (B, F, H, W) with
    (B, H, W) labels, or tiles of (B, F) with (B,) labels; IGNORE_INDEX dropped."""
    if values.ndim == 4:
        values = values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])
        labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    return values[keep], labels[keep]


@dataclass(frozen=True)
class RidgeHead:
    """A fitted ridge head: z-scoring of the support features, weights and bias per class."""

    mean: Tensor
    scale: Tensor
    weights: Tensor
    bias: Tensor

    def logits(self, values: Tensor) -> Tensor:
        """Class scores of (n, F) features, (B, F, H, W) maps or (B, F) tiles (class axis 1)."""
        if values.ndim == 4:
            flat = values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])
            scores = self.logits(flat)
            batch, _, height, width = values.shape
            return scores.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        return ((values - self.mean) / self.scale) @ self.weights + self.bias


def ridge_fit(values: Tensor, labels: Tensor, classes: int, penalty: Tensor | float) -> RidgeHead:
    """Ridge regression of one-hot targets on z-scored features, in closed form.

    With fewer labelled items than features (the few-shot case) the dual form is solved: an
    n x n system (Woodbury), as R2-D2 does, so the cost follows the labels, not the embedding.
    Centred targets and features make the bias the class prior, unpenalised.
    """
    values = values.float()
    mean = values.mean(dim=0, keepdim=True)
    scale = values.std(dim=0, keepdim=True, unbiased=False).clamp(min=FEATURE_EPSILON)
    centred = (values - mean) / scale
    targets = torch.nn.functional.one_hot(labels, classes).float()
    prior = targets.mean(dim=0, keepdim=True)
    targets = targets - prior
    count, width = centred.shape
    if count <= width:
        gram = centred @ centred.T + penalty * torch.eye(count, device=values.device)
        weights = centred.T @ torch.linalg.solve(gram, targets)
    else:
        gram = centred.T @ centred + penalty * torch.eye(width, device=values.device)
        weights = torch.linalg.solve(gram, centred.T @ targets)
    return RidgeHead(mean=mean, scale=scale, weights=weights, bias=prior.squeeze(0))
