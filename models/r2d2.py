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
from models.device import model_device
from models.heads import features, labelled_rows, ridge_fit
from models.learner import EpisodeLike, Learner, LearnerSettings, TaskTensors

INITIAL_PENALTY = 1.0
INITIAL_SCALE = 10.0


class RidgeLearner(Learner):
    """A model, the head's log-penalty and log-scale, and the outer Adam optimiser."""

    name = "r2d2"
    adaptation = "ridge"

    def __init__(
        self,
        model: nn.Module,
        settings: LearnerSettings = LearnerSettings(),
        *,
        penalty: float = INITIAL_PENALTY,
        scale: float = INITIAL_SCALE,
    ) -> None:
        super().__init__(model, settings)
        device = model_device(model)
        self.log_penalty = nn.Parameter(torch.tensor(math.log(penalty), device=device))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), device=device))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=settings.outer_lr)

    def penalty(self) -> float:
        return float(self.log_penalty.detach().exp())

    def run_fields(self) -> dict:
        return {"head_penalty": self.penalty(), "head_scale": float(self.log_scale.detach().exp())}

    def task_loss(self, task: TaskTensors) -> Tensor:
        """Query loss of the ridge head fitted on the task's support set."""
        support, labels = labelled_rows(features(self.model, task.support_x), task.support_y)
        head = ridge_fit(support, labels, len(task.classes), self.log_penalty.exp())
        logits = head.logits(features(self.model, task.query_x)) * self.log_scale.exp()
        return episode_loss(logits, task.query_y)

    def step(self, batch: Sequence[EpisodeLike], iteration: int) -> float:
        """One Adam step on the mean query loss of a meta-batch; returns that loss."""
        return self.accumulate(batch, self.task_loss)
