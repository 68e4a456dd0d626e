"""Prototypical networks (Snell et al. 2017): a class's prototype is the mean feature vector of
its labelled pixels (or tiles), and an item is scored by its negative squared distance to each
prototype. Meta-training backpropagates the query loss of those scores into the network;
adapting to a scene is one forward pass and a mean per class, no fine-tuning and no budget.

Features are those every closed-form head uses (`models.heads.features`): the embedding, the
standardised bands and their neighbourhood means (per-tile band mean and std for
classification), so a prototype never knows less than the bands.
Since -|x - c|^2 = 2 x.c - |c|^2 - |x|^2 and the last term is the same for every class, the
prototypes are a linear head: weights 2c, bias -|c|^2 (`prototype_head`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.backbones import episode_loss
from models.heads import features, labelled_rows
from models.learner import EpisodeLike, Learner, LearnerSettings, TaskTensors


def prototypes(rows: Tensor, labels: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(count, F) class means of labelled (n, F) rows, and which classes had a row."""
    one_hot = torch.nn.functional.one_hot(labels, count).to(rows.dtype)
    sizes = one_hot.sum(dim=0)
    means = (one_hot.T @ rows) / sizes.clamp(min=1).unsqueeze(1)
    return means, sizes > 0


def prototype_logits(values: Tensor, means: Tensor, present: Tensor | None = None) -> Tensor:
    """Negative squared distances of (n, F) rows, (B, F) tiles or (B, F, H, W) maps to each
    prototype, class axis 1; classes without a prototype get -inf."""
    if values.ndim == 4:
        batch, width, height, across = values.shape
        flat = prototype_logits(values.permute(0, 2, 3, 1).reshape(-1, width), means, present)
        return flat.reshape(batch, height, across, -1).permute(0, 3, 1, 2)
    logits = -torch.cdist(values.float(), means.float()).pow(2)
    if present is not None:
        logits = logits.masked_fill(~present, float("-inf"))
    return logits


def prototype_head(means: Tensor) -> tuple[Tensor, Tensor]:
    """The prototypes as linear weights (F, N) and bias (N,): the same softmax as the distances."""
    return 2 * means.T, -(means**2).sum(dim=1)


class ProtoNet(Learner):
    name = "protonet"
    adaptation = "prototypes"

    def __init__(self, model: nn.Module, settings: LearnerSettings = LearnerSettings()) -> None:
        super().__init__(model, settings)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=settings.outer_lr)

    def task_loss(self, task: TaskTensors) -> Tensor:
        rows, labels = labelled_rows(features(self.model, task.support_x), task.support_y)
        means, present = prototypes(rows, labels, len(task.classes))
        return episode_loss(prototype_logits(features(self.model, task.query_x), means, present), task.query_y)

    def step(self, batch: Sequence[EpisodeLike], iteration: int) -> float:
        return self.accumulate(batch, self.task_loss)
