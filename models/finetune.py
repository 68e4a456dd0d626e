"""Test-time fine-tuning and prediction: the one adaptation used by every method, in evaluation
and when adapting to a new region.

The optimiser is plain full-batch SGD on the support loss, i.e. exactly MAML's inner loop
(`models.maml.inner_step`), for every method. A MAML model is fine-tuned the way it was
meta-trained, so its meta-trained step count and learned per-tensor rates carry over unchanged;
pretrain and random-init models get the same optimiser with a scalar rate, and each method's
(steps, rate) budget is picked on validation regions. Adam was the alternative for the
baselines, but its per-coordinate normalisation would make "steps and rate" mean something
different for each method.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.backbones import IGNORE_INDEX, episode_logits
from models.device import as_images, as_labels, autocast, forward_batch, model_device
from models.maml import Schedule, adapted_names, inner_step, rates_at


def finetune(
    model: nn.Module,
    support_x: np.ndarray | Tensor,
    support_y: np.ndarray | Tensor,
    classes: np.ndarray | Tensor | Sequence[int],
    *,
    steps: int,
    lr: Schedule,
    seed: int = 0,
    only: Collection[str] | None = None,
    first_step: int = 0,
) -> nn.Module:
    """A copy of `model` after `steps` SGD steps on the support set (labels 0..N-1 of `classes`).

    `lr` is one rate, or a run's learned rates (`models.maml.Schedule`); `only` limits the update
    to those parameters (ANIL's last layer); `first_step` continues a per-step schedule (a copy
    already tuned for that many steps). 0 steps, or a
    support set without a labelled item, give an unchanged copy. The seed is applied in a forked
    RNG, so the result depends on (model, support, budget, seed) only. Gradients are switched
    on inside, so callers may hold `torch.no_grad()`.
    """
    tuned = copy.deepcopy(model).train()
    device = model_device(tuned)
    labels = as_labels(support_y, device)
    if steps == 0 or not bool((labels != IGNORE_INDEX).any()):
        return tuned.eval()
    images, class_ids = as_images(tuned, support_x), as_labels(classes, device)
    params = {name: p.detach().requires_grad_() for name, p in tuned.named_parameters()}
    names = adapted_names(params, only)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        torch.manual_seed(seed)
        for step in range(steps):
            with autocast(device):
                params = inner_step(
                    tuned,
                    params,
                    images,
                    labels,
                    class_ids,
                    rates_at(lr, names, first_step + step),
                    create_graph=False,
                    only=only,
                )
            params = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            p.copy_(params[name])
    return tuned.eval()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray | Tensor,
    classes: np.ndarray | Tensor | Sequence[int] | None = None,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Softmax scores over an episode's classes (all classes with None), float32 numpy.

    (B, N) for classification, (B, N, H, W) for segmentation; argmax over axis 1 gives the
    episode labels 0..N-1. Scores, not labels, so overlapping windows can be averaged. The
    network sees `batch_size` items at a time, fewer on a CPU (`models.device.forward_batch`).
    """
    model.eval()
    device = model_device(model)
    class_ids = None if classes is None else as_labels(classes, device)
    step = forward_batch(device, images.shape, batch_size)
    scores: np.ndarray | None = None
    for start in range(0, len(images), step):
        with autocast(device):
            logits = model(as_images(model, images[start : start + step]))
        chunk = episode_logits(logits, class_ids).float().softmax(dim=1).cpu().numpy()
        if scores is None:
            scores = chunk if step >= len(images) else np.empty((len(images), *chunk.shape[1:]), np.float32)
        if scores is not chunk:
            scores[start : start + step] = chunk
    return scores if scores is not None else np.empty((0, 0), np.float32)
