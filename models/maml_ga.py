"""MAML with gradient agreement (Eshratifar et al., NeurIPS 2018 workshop on meta-learning).

Each task's outer gradient `g_i` (its update vector over every trained tensor, learned rates
included) is weighted by how well it agrees with the meta-batch's sum:

    w_i = (g_i . G) / sum_k |g_k . G|,   G = sum_j g_j,

and the outer step follows `sum_i w_i g_i`. When every task agrees the weights are 1/n, i.e.
MAML's mean; a task that pulls against the batch pulls less, or is pushed away from. No library
implements it, so the weighting is here and tested against hand-made gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from models.device import autocast, model_device
from models.learner import EpisodeLike, task_tensors
from models.maml import MetaLearner, Params, channels_last


def agreement_weights(gradients: Tensor) -> Tensor:
    """The weights of (n, P) per-task gradients; equal weights when no task has a gradient."""
    dots = gradients @ gradients.sum(dim=0)
    norm = dots.abs().sum()
    if norm <= 0:
        return torch.full_like(dots, 1.0 / len(dots))
    return dots / norm


class MamlGa(MetaLearner):
    name = "maml-ga"

    def step(self, batch: Sequence[EpisodeLike], iteration: int) -> float:
        """One outer Adam step along the agreement-weighted sum of the tasks' gradients."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        params: Params = dict(self.model.named_parameters())
        trained = [p for p in self.parameters() if p.requires_grad]
        device, rows, total = model_device(self.model), [], 0.0
        for episode in batch:
            with autocast(device), self.second_order_kernels():
                loss = self.task_loss(params, channels_last(task_tensors(self.model, episode)), iteration)
            grads = torch.autograd.grad(loss, trained, allow_unused=True)
            rows.append(
                torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, trained)])
            )
            total += loss.item() / len(batch)
        stacked = torch.stack(rows)
        combined = agreement_weights(stacked) @ stacked
        for parameter, part in zip(trained, combined.split([p.numel() for p in trained])):
            parameter.grad = part.view_as(parameter)
        self.clip_and_step()
        return total
