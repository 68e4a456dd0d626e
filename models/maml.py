"""MAML and first-order MAML through `torch.func.functional_call`, in the style of PyTorch's
functorch MAML example: parameters are a dict of tensors that the inner loop replaces, never
writes in place, so the outer gradient flows through every inner step.

Inner loop: S steps of plain SGD on the support loss, `p <- p - lr_p * grad_p`, with one rate per
parameter tensor, learned as log-rates (Meta-SGD / MAML++ style) or fixed. Second order by
default (`create_graph=True`); first order (FOMAML) drops the inner gradients' own graph. Some
encoders leave parameters unused in a forward pass: their gradient is None, i.e. zero, and they
stay as they are. Outer loop: Adam on the mean query loss of a meta-batch, gradient-norm clipped.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from models.backbones import episode_loss
from models.device import as_images, as_labels, autocast, model_device

Params = dict[str, Tensor]
Rates = Mapping[str, Tensor | float]


class EpisodeLike(Protocol):
    """What MAML reads of `tasks.episodes.Episode` (models does not import tasks)."""

    classes: np.ndarray
    support_images: np.ndarray
    support_labels: np.ndarray
    query_images: np.ndarray
    query_labels: np.ndarray


@dataclass(frozen=True)
class TaskTensors:
    """One episode on the model's device: images in the model's dtype, labels and classes int64."""

    classes: Tensor
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def task_tensors(model: nn.Module, episode: EpisodeLike) -> TaskTensors:
    """The one conversion of an episode's numpy arrays to tensors on the model's device."""
    device = model_device(model)
    return TaskTensors(
        classes=as_labels(episode.classes, device),
        support_x=as_images(model, episode.support_images),
        support_y=as_labels(episode.support_labels, device),
        query_x=as_images(model, episode.query_images),
        query_y=as_labels(episode.query_labels, device),
    )


def per_tensor_rates(params: Mapping[str, Tensor], lr: float | Rates) -> Rates:
    """One rate per parameter tensor: a float applies to all, a mapping must name every tensor."""
    if isinstance(lr, Mapping):
        missing = sorted(set(params) - set(lr))
        if missing:
            raise KeyError(f"no inner rate for parameter {missing[0]!r}")
        return lr
    return {name: lr for name in params}


def inner_step(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, classes: Tensor,
    lrs: Rates, *, create_graph: bool,
) -> Params:
    """One SGD step on the support loss; the update rule shared by MAML and `finetune`."""
    loss = episode_loss(functional_call(model, params, (x,)), y, classes)
    names = [name for name, value in params.items() if value.requires_grad]
    grads = torch.autograd.grad(
        loss, [params[name] for name in names], create_graph=create_graph, allow_unused=True
    )
    updated = dict(params)
    for name, grad in zip(names, grads):
        if grad is not None:
            updated[name] = params[name] - lrs[name] * grad
    return updated


def adapt(
    model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, classes: Tensor,
    *, steps: int, lr: float | Rates, first_order: bool = False,
) -> Params:
    """Parameters after `steps` inner SGD steps; differentiable w.r.t. `params` and the rates."""
    lrs = per_tensor_rates(params, lr)
    for _ in range(steps):
        params = inner_step(
            model, params, support_x, support_y, classes, lrs, create_graph=not first_order
        )
    return params


def query_loss(
    model: nn.Module, params: Params, task: TaskTensors,
    *, steps: int, lr: float | Rates, first_order: bool = False,
) -> Tensor:
    """The loss on a task's query set after adapting `params` on its support set."""
    adapted = adapt(
        model, params, task.support_x, task.support_y, task.classes,
        steps=steps, lr=lr, first_order=first_order,
    )
    logits = functional_call(model, adapted, (task.query_x,))
    return episode_loss(logits, task.query_y, task.classes)


def meta_loss(
    model: nn.Module, params: Params, tasks: Sequence[TaskTensors],
    *, steps: int, lr: float | Rates, first_order: bool = False,
) -> Tensor:
    """The MAML objective: mean query loss over a meta-batch (also a meta-validation score)."""
    losses = [
        query_loss(model, params, task, steps=steps, lr=lr, first_order=first_order)
        for task in tasks
    ]
    return torch.stack(losses).mean()


class MetaLearner(nn.Module):
    """A model, its per-parameter-tensor inner log-rates and the outer Adam optimiser.

    `log_lrs` holds one entry per tensor of `model.named_parameters()`, in that order; with
    `learn_inner_lr=False` it is a fixed buffer. Rates are learned in log space so they stay
    positive, by Adam at `rate_lr` (default `outer_lr`): a log-rate moves about `rate_lr` per
    step, so at 1e-3 the rates stay at their initial value for a few hundred iterations and
    need their own, larger rate (Meta-SGD / MAML++ learn them alongside the weights).
    """

    def __init__(
        self, model: nn.Module, *, steps: int = 3, inner_lr: float = 0.01,
        learn_inner_lr: bool = True, first_order: bool = False,
        outer_lr: float = 1e-3, max_grad_norm: float = 10.0, rate_lr: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.steps, self.first_order, self.max_grad_norm = steps, first_order, max_grad_norm
        log_lrs = torch.full((len(self.names),), math.log(inner_lr), device=model_device(model))
        if learn_inner_lr:
            self.log_lrs = nn.Parameter(log_lrs)
        else:
            self.register_buffer("log_lrs", log_lrs)
        self.trainable = [p for p in self.parameters() if p.requires_grad]
        weights = [p for p in model.parameters() if p.requires_grad]
        groups: list[dict] = [{"params": weights, "lr": outer_lr}]
        if learn_inner_lr:
            groups.append({"params": [self.log_lrs], "lr": outer_lr if rate_lr is None else rate_lr})
        self.optimizer = torch.optim.Adam(groups, lr=outer_lr)

    def inner_lrs(self) -> dict[str, float]:
        """The current inner rate of each parameter tensor, for checkpoints and `finetune`."""
        return dict(zip(self.names, self.log_lrs.detach().exp().tolist()))

    def _rates(self) -> dict[str, Tensor]:
        """The inner rates as a differentiable function of `log_lrs`."""
        return dict(zip(self.names, self.log_lrs.exp().unbind()))

    def meta_train_step(self, episodes: Sequence[EpisodeLike]) -> float:
        """One outer Adam step on a meta-batch; returns its mean query loss.

        Each task is backpropagated on its own (gradients accumulate), so only one task's
        second-order graph is alive at a time.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        params = dict(self.model.named_parameters())
        device, total = model_device(self.model), 0.0
        for episode in episodes:
            with autocast(device):
                loss = query_loss(
                    self.model, params, task_tensors(self.model, episode),
                    steps=self.steps, lr=self._rates(), first_order=self.first_order,
                ) / len(episodes)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        return total
