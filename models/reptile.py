"""Reptile (Nichol, Achiam & Schulman 2018): first order without a query gradient. Each task of
a meta-batch is fitted by `inner_steps` plain SGD steps on its whole data (support and query
losses summed), and the initialisation moves toward the mean of the adapted weights:

    theta <- theta + eps * (mean_i phi_i - theta),

with `eps` annealed linearly from `reptile_step` to 0 over the run. The move is an SGD step of
rate eps on the "gradient" theta - mean phi, so the optimiser and its checkpoint are SGD's.
At test time the network is fine-tuned like any other, at the budget picked on validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from models.backbones import episode_loss
from models.device import autocast, model_device
from models.learner import EpisodeLike, Learner, LearnerSettings, TaskTensors, task_tensors
from models.maml import Params


class Reptile(Learner):
    name = "reptile"

    def __init__(self, model: nn.Module, settings: LearnerSettings = LearnerSettings()) -> None:
        super().__init__(model, settings)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=settings.reptile_step)

    def run_fields(self) -> dict:
        """Validation fine-tunes as the inner loop fits a task: its steps at its rate."""
        return {"inner_steps": self.settings.inner_steps, "inner_lr": self.settings.reptile_inner_lr}

    def outer_step_size(self, iteration: int) -> float:
        return self.settings.reptile_step * max(0.0, 1.0 - iteration / max(self.settings.iterations, 1))

    def fit_task(self, start: Params, task: TaskTensors) -> tuple[Params, float]:
        """The task's adapted weights after the inner loop, and its loss before it."""
        params = {name: value.detach().requires_grad_() for name, value in start.items()}
        first = 0.0
        for step in range(self.settings.inner_steps):
            loss = episode_loss(functional_call(self.model, params, (task.support_x,)), task.support_y, task.classes)
            loss = loss + episode_loss(functional_call(self.model, params, (task.query_x,)), task.query_y, task.classes)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            params = {
                name: (value if grad is None else value - self.settings.reptile_inner_lr * grad)
                .detach()
                .requires_grad_()
                for (name, value), grad in zip(params.items(), grads)
            }
            first = loss.item() if step == 0 else first
        return params, first

    def step(self, batch: Sequence[EpisodeLike], iteration: int) -> float:
        """Move the weights `outer_step_size` of the way to the tasks' mean adapted weights."""
        self.model.train()
        start = {name: p.detach() for name, p in self.model.named_parameters()}
        mean = {name: torch.zeros_like(value) for name, value in start.items()}
        device, total = model_device(self.model), 0.0
        for episode in batch:
            with autocast(device):
                adapted, loss = self.fit_task(start, task_tensors(self.model, episode))
            for name, value in adapted.items():
                mean[name] += value.detach() / len(batch)
            total += loss / len(batch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.outer_step_size(iteration)
        for name, parameter in self.model.named_parameters():
            parameter.grad = start[name] - mean[name]
        self.optimizer.step()
        return total
