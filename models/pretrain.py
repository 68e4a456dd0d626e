"""The pretrain baseline: ordinary supervised training on batches pooled from all meta-train
regions, on global class ids, with the same head and loss as every other method.

Random init is `build_model(config, seed)` with no training at all.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.backbones import episode_loss
from models.device import as_images, as_labels, autocast, model_device
from models.learner import Learner, LearnerSettings


class Pretrain(Learner):
    """Adam on cross-entropy over all classes (labels are global ids, 255 ignored), like MAML's
    outer loop, so the two differ in their objective only; gradient-norm clipped likewise."""

    name = "pretrain"
    episodic = False

    def __init__(self, model: nn.Module, settings: LearnerSettings = LearnerSettings()) -> None:
        super().__init__(model, settings)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=settings.outer_lr)

    def step(self, batch: tuple[np.ndarray, np.ndarray], iteration: int) -> float:
        images, labels = batch
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        device = model_device(self.model)
        with autocast(device):
            loss = episode_loss(self.model(as_images(self.model, images)), as_labels(labels, device))
        loss.backward()
        self.clip_and_step()
        return loss.item()
