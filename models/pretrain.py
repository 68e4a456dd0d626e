"""The pretrain baseline: ordinary supervised training on batches pooled from all meta-train
regions, on global class ids, with the same head and loss as every other method.

Random init is `build_model(config, seed)` with no training at all.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from models.backbones import episode_loss
from models.device import as_images, as_labels, autocast, model_device


def pretrain_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    """Adam, like MAML's outer loop, so the two methods differ in their objective only."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def pretrain_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    *,
    max_grad_norm: float = 10.0,
) -> float:
    """One step of cross-entropy over all classes (labels are global ids, 255 ignored).

    Gradient-norm clipped like MAML's outer step.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device = model_device(model)
    with autocast(device):
        loss = episode_loss(model(as_images(model, images)), as_labels(labels, device))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()
