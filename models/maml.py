"""MAML and first-order MAML through `torch.func.functional_call`, in the style of PyTorch's
functorch MAML example: parameters are a dict of tensors that the inner loop replaces, never
writes in place, so the outer gradient flows through every inner step.

Inner loop: S steps of plain SGD on the support loss, `p <- p - lr_p * grad_p`. Rates are one per
parameter tensor (MAML, learned as log-rates), one per parameter element (Meta-SGD) or one per
tensor and step (MAML++): a `Schedule` is a scalar, one mapping for every step, or one mapping per
step. Second order by default (`create_graph=True`); first order (FOMAML) drops the inner
gradients' own graph. Some encoders leave parameters unused in a forward pass: their gradient is
None, i.e. zero, and they stay as they are. Outer loop: Adam on the mean query loss of a
meta-batch, gradient-norm clipped.

`MetaLearner` is the shared machinery of every learner with a differentiable inner loop (MAML,
FOMAML, Meta-SGD, MAML++, ANIL, gradient agreement); each is a subclass in its own module.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from models.backbones import episode_loss
from models.device import model_device
from models.learner import EpisodeLike, Learner, LearnerSettings, TaskTensors

Params = dict[str, Tensor]
Rates = Mapping[str, Tensor | float]
Schedule = float | Rates | Sequence[Rates]
"""Inner rates: one for all, one per tensor (or element) for every step, or a mapping per step
(steps beyond the last use the last)."""


def rates_at(lr: Schedule, names: Collection[str], step: int) -> Rates:
    """The rates of inner step `step` for the parameters `names`; a mapping must name them all."""
    if isinstance(lr, Mapping):
        missing = sorted(set(names) - set(lr))
        if missing:
            raise KeyError(f"no inner rate for parameter {missing[0]!r}")
        return lr
    if isinstance(lr, Sequence):
        return rates_at(lr[min(step, len(lr) - 1)], names, step)
    return {name: lr for name in names}


def adapted_names(params: Mapping[str, Tensor], only: Collection[str] | None) -> list[str]:
    """The parameters an inner loop updates: those requiring grad, within `only` when given."""
    return [n for n, value in params.items() if value.requires_grad and (only is None or n in only)]


def inner_step(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    classes: Tensor,
    lrs: Rates,
    *,
    create_graph: bool,
    only: Collection[str] | None = None,
) -> Params:
    """One SGD step on the support loss; the update rule shared by MAML and `finetune`."""
    loss = episode_loss(functional_call(model, params, (x,)), y, classes)
    names = adapted_names(params, only)
    grads = torch.autograd.grad(loss, [params[name] for name in names], create_graph=create_graph, allow_unused=True)
    updated = dict(params)
    for name, grad in zip(names, grads):
        if grad is not None:
            rate = lrs[name]
            updated[name] = params[name] - (rate.to(grad.device) if isinstance(rate, Tensor) else rate) * grad
    return updated


def trajectory(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    classes: Tensor,
    *,
    steps: int,
    lr: Schedule,
    first_order: bool = False,
    only: Collection[str] | None = None,
) -> list[Params]:
    """The parameters after each of `steps` inner SGD steps; differentiable w.r.t. `params` and
    the rates (through the inner gradients too unless `first_order`)."""
    names = adapted_names(params, only)
    after = []
    for step in range(steps):
        params = inner_step(
            model,
            params,
            support_x,
            support_y,
            classes,
            rates_at(lr, names, step),
            create_graph=not first_order,
            only=only,
        )
        after.append(params)
    return after


def adapt(
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    classes: Tensor,
    *,
    steps: int,
    lr: Schedule,
    first_order: bool = False,
    only: Collection[str] | None = None,
) -> Params:
    """Parameters after `steps` inner SGD steps; differentiable w.r.t. `params` and the rates."""
    path = trajectory(
        model,
        params,
        support_x,
        support_y,
        classes,
        steps=steps,
        lr=lr,
        first_order=first_order,
        only=only,
    )
    return path[-1] if path else params


def query_loss(
    model: nn.Module,
    params: Params,
    task: TaskTensors,
    *,
    steps: int,
    lr: Schedule,
    first_order: bool = False,
    only: Collection[str] | None = None,
) -> Tensor:
    """The loss on a task's query set after adapting `params` on its support set."""
    adapted = adapt(
        model,
        params,
        task.support_x,
        task.support_y,
        task.classes,
        steps=steps,
        lr=lr,
        first_order=first_order,
        only=only,
    )
    logits = functional_call(model, adapted, (task.query_x,))
    return episode_loss(logits, task.query_y, task.classes)


def meta_loss(
    model: nn.Module,
    params: Params,
    tasks: Sequence[TaskTensors],
    *,
    steps: int,
    lr: Schedule,
    first_order: bool = False,
) -> Tensor:
    """The MAML objective: mean query loss over a meta-batch (also a meta-validation score)."""
    losses = [query_loss(model, params, task, steps=steps, lr=lr, first_order=first_order) for task in tasks]
    return torch.stack(losses).mean()


class MetaLearner(Learner):
    """A model, its learned inner log-rates and the outer Adam optimiser: the machinery of every
    learner that differentiates through an inner SGD loop.

    `rate_shape` says what a rate covers: a parameter tensor ("tensor"), each element ("element",
    Meta-SGD) or a tensor at one inner step ("step", MAML++). Rates are learned in log space, so
    they stay positive, by Adam at `rate_lr`; with `learn_inner_lr=False` they stay fixed.
    """

    rate_shape: ClassVar[Literal["tensor", "element", "step"]] = "tensor"
    first_order: ClassVar[bool] = False

    def __init__(self, model: nn.Module, settings: LearnerSettings = LearnerSettings()) -> None:
        super().__init__(model, settings)
        named = dict(model.named_parameters())
        self.names = self.inner_names()
        self.log_lrs = nn.ParameterList(
            [
                nn.Parameter(
                    torch.full(self._rate_size(named[name]), math.log(settings.inner_lr), device=model_device(model)),
                    requires_grad=settings.learn_inner_lr,
                )
                for name in self.names
            ]
        )
        weights = [p for p in model.parameters() if p.requires_grad]
        groups: list[dict] = [{"params": weights, "lr": settings.outer_lr}]
        if settings.learn_inner_lr:
            groups.append({"params": list(self.log_lrs), "lr": settings.rate_lr})
        self.optimizer = torch.optim.Adam(groups, lr=settings.outer_lr)

    def inner_names(self) -> list[str]:
        """The parameters the inner loop adapts: all of them (ANIL: the last layer's)."""
        return [name for name, _ in self.model.named_parameters()]

    @property
    def only(self) -> frozenset[str] | None:
        """`inner_names` as the inner loop's filter (None: every parameter)."""
        every = [name for name, _ in self.model.named_parameters()]
        return None if self.names == every else frozenset(self.names)

    def _rate_size(self, parameter: Tensor) -> tuple[int, ...]:
        if self.rate_shape == "element":
            return tuple(parameter.shape)
        if self.rate_shape == "step":
            return (max(self.settings.inner_steps, 1),)
        return ()

    def schedule(self) -> list[dict[str, Tensor]]:
        """The inner rates as a differentiable function of the log-rates, one mapping per step."""
        rates = [log_lr.exp() for log_lr in self.log_lrs]
        if self.rate_shape == "step":
            return [
                {name: rate[step] for name, rate in zip(self.names, rates)}
                for step in range(max(self.settings.inner_steps, 1))
            ]
        return [dict(zip(self.names, rates))]

    def inner_rates(self) -> dict[str, Tensor]:
        return {name: log_lr.detach().exp().cpu() for name, log_lr in zip(self.names, self.log_lrs)}

    def run_fields(self) -> dict:
        return {
            "inner_steps": self.settings.inner_steps,
            "inner_lr": self.settings.inner_lr,
            "learn_inner_lr": self.settings.learn_inner_lr,
            "first_order": self.first_order,
        }

    def task_loss(self, params: Params, task: TaskTensors, iteration: int) -> Tensor:
        """The outer objective of one task: its query loss after the inner loop."""
        return query_loss(
            self.model,
            params,
            task,
            steps=self.settings.inner_steps,
            lr=self.schedule(),
            first_order=self.first_order,
            only=self.only,
        )

    def step(self, batch: Sequence[EpisodeLike], iteration: int) -> float:
        """One outer Adam step on a meta-batch; returns its mean query loss."""
        params: Params = dict(self.model.named_parameters())
        return self.accumulate(batch, lambda task: self.task_loss(params, task, iteration))


class Maml(MetaLearner):
    """MAML (Finn et al. 2017) with learned per-tensor inner rates, second order."""

    name = "maml"


class Fomaml(MetaLearner):
    """First-order MAML: the outer gradient is the query gradient at the adapted weights."""

    name = "fomaml"
    first_order = True
