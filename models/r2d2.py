"""Meta-training through a closed-form head (R2-D2, Bertinetto et al., ICLR 2019).

Each episode: embed the support set, fit a ridge head on its labelled pixels (or tiles) in
closed form (`models.heads.ridge_fit`), score the query set with it, and backpropagate the query
loss through the solve into the embedding. The embedding thus learns to make a head fitted on a
few pixels generalise; at test time the same fit is the whole adaptation: one solve, no step
budget. The ridge penalty and a logit scale (ridge outputs live near 0..1, cross-entropy wants a
wider range) are meta-learned beside the weights, in log space so they stay positive.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.backbones import episode_loss
from models.device import autocast, model_device
from models.heads import features, labelled_rows, ridge_fit
from models.maml import EpisodeLike, TaskTensors, task_tensors

INITIAL_PENALTY = 1.0
INITIAL_SCALE = 10.0


class RidgeMetaLearner(nn.Module):
    """A model, the head's log-penalty and log-scale, and the outer Adam optimiser."""

    def __init__(
        self, model: nn.Module, *, outer_lr: float = 1e-3, max_grad_norm: float = 10.0,
        penalty: float = INITIAL_PENALTY, scale: float = INITIAL_SCALE,
    ) -> None:
        super().__init__()
        self.model = model
        device = model_device(model)
        self.log_penalty = nn.Parameter(torch.tensor(math.log(penalty), device=device))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), device=device))
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.Adam(self.parameters(), lr=outer_lr)

    def penalty(self) -> float:
        return float(self.log_penalty.detach().exp())

    def task_loss(self, task: TaskTensors) -> Tensor:
        """Query loss of the ridge head fitted on the task's support set."""
        support, labels = labelled_rows(features(self.model, task.support_x), task.support_y)
        head = ridge_fit(support, labels, len(task.classes), self.log_penalty.exp())
        logits = head.logits(features(self.model, task.query_x)) * self.log_scale.exp()
        return episode_loss(logits, task.query_y)

    def meta_train_step(self, episodes: Sequence[EpisodeLike]) -> float:
        """One Adam step on the mean query loss of a meta-batch; returns that loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        device, total = model_device(self.model), 0.0
        for episode in episodes:
            with autocast(device):
                loss = self.task_loss(task_tensors(self.model, episode)) / len(episodes)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return total
