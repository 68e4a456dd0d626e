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

Speed (benchmarks/maml_step.py, against the `higher` library on the same model, episodes and loss):
- the loss of a sparse segmentation support set (a few labelled pixels per class) is computed on
  the labelled pixels only (`labelled_loss`, the same value), not over whole logit maps whose
  cross-entropy, class selection and their double backward second order would pay for per pixel;
- images go channels-last into the network (oneDNN's convolutions on few channels run faster so);
- on a CPU, GroupNorm's double backward is PyTorch's fused kernel plus three dot products
  (`models.second_order`) rather than a generic re-implementation differentiated op by op;
- on CUDA the tasks of a meta-batch are adapted side by side (`batched_query_losses`: one
  `torch.func.vmap`-ed forward over the stacked supports with per-task weights, a quarter of the
  small kernels); on a CPU task by task, where on one core the convolutions themselves are the
  cost and grouped ones ran slower than the loop (`MetaLearner.task_batching`; the benchmark
  times both ways);
- no copies of the model: parameters are a dict of tensors that `functional_call` swaps in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from models.backbones import IGNORE_INDEX, episode_loss
from models.device import autocast, model_device
from models.learner import EpisodeLike, Learner, LearnerSettings, TaskTensors, task_tensors
from models.second_order import second_order_norms

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


SPARSE_LABELS = 0.25
"""`labelled_loss` gathers the labelled pixels when at most this fraction of them is labelled."""


def labelled_loss(logits: Tensor, labels: Tensor, classes: Tensor | None = None) -> Tensor:
    """`episode_loss` (the same value, and gradients up to float rounding), computed on the
    labelled pixels only when few are: a sparse support set of K pixels per class then costs K
    rows of cross-entropy, and its gradient one scatter, not a pass over every logit map."""
    if labels.dim() < 2:
        return episode_loss(logits, labels, classes)
    flat = labels.reshape(-1)
    picked = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    if picked.numel() > SPARSE_LABELS * flat.numel():
        return episode_loss(logits, labels, classes)
    # (B, K, H, W) -> (B*H*W, K): a view of channels-last logits
    rows = logits.movedim(1, -1).reshape(-1, logits.shape[1]).index_select(0, picked)
    return episode_loss(rows, flat.index_select(0, picked), classes)


def channels_last(task: TaskTensors) -> TaskTensors:
    """The task with its (B, C, H, W) images channels-last, the layout convolutions run fastest in."""
    if task.support_x.dim() != 4 or task.query_x.dim() != 4:
        return task
    return dataclasses.replace(
        task,
        support_x=task.support_x.contiguous(memory_format=torch.channels_last),
        query_x=task.query_x.contiguous(memory_format=torch.channels_last),
    )


def _scaled(rate: Tensor | float, grad: Tensor) -> Tensor:
    return (rate.to(grad.device) if isinstance(rate, Tensor) else rate) * grad


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
    loss = labelled_loss(functional_call(model, params, (x,)), y, classes)
    names = adapted_names(params, only)
    grads = torch.autograd.grad(loss, [params[name] for name in names], create_graph=create_graph, allow_unused=True)
    updated = dict(params)
    for name, grad in zip(names, grads):
        if grad is not None:
            updated[name] = params[name] - _scaled(lrs[name], grad)
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
    return labelled_loss(logits, task.query_y, task.classes)


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


def _padded(images: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(T, B, ...) images and labels of T tasks, each padded to the most items with copies of its
    first image labelled IGNORE_INDEX: they add nothing to the task's loss (a sum over labelled
    pixels) or its gradient, and GroupNorm normalises each item on its own."""
    most = max(len(x) for x in images)
    xs, ys = [], []
    for x, y in zip(images, labels):
        pad = most - len(x)
        ignored = torch.full((pad, *y.shape[1:]), IGNORE_INDEX, dtype=y.dtype, device=y.device)
        xs.append(torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) if pad else x)
        ys.append(torch.cat([y, ignored]) if pad else y)
    return torch.stack(xs), torch.stack(ys)


def batch_key(task: TaskTensors) -> tuple:
    """Tasks with the same key can be adapted side by side: their item shapes and class counts agree."""
    return (
        tuple(task.support_x.shape[1:]),
        tuple(task.support_y.shape[1:]),
        tuple(task.query_x.shape[1:]),
        tuple(task.query_y.shape[1:]),
        task.classes.numel(),
        len(task.support_x) > 0,
        len(task.query_x) > 0,
    )


def batched_query_losses(
    model: nn.Module,
    params: Params,
    tasks: Sequence[TaskTensors],
    *,
    steps: int,
    lr: Schedule,
    first_order: bool = False,
    only: Collection[str] | None = None,
) -> Tensor:
    """`query_loss` of each task, (T,), the tasks adapted side by side.

    The adapted parameters carry a leading task axis (`params` expanded T times at first), and
    each forward is one `torch.func.vmap` of `functional_call` over the tasks' stacked images
    (`_padded`), i.e. grouped convolutions with per-task weights; the inner gradients of every
    task come from one `autograd.grad` of the summed losses (the tasks do not interact).
    Parameters outside `only` stay shared (one convolution over every task's items). Tasks must
    share `batch_key`.
    """
    names = adapted_names(params, only)
    classes = torch.stack([task.classes for task in tasks])
    support_x, support_y = _padded([t.support_x for t in tasks], [t.support_y for t in tasks])
    query_x, query_y = _padded([t.query_x for t in tasks], [t.query_y for t in tasks])
    shared = {name: value for name, value in params.items() if name not in names}

    def losses(fast: Params, images: Tensor, labels: Tensor) -> Tensor:
        def one(weights: Params, x: Tensor, y: Tensor, ids: Tensor) -> Tensor:
            return episode_loss(functional_call(model, {**shared, **weights}, (x,)), y, ids)

        return vmap(one)(fast, images, labels, classes)

    fast = {name: params[name].expand(len(tasks), *params[name].shape) for name in names}
    for step in range(steps):
        total = losses(fast, support_x, support_y).sum()
        grads = torch.autograd.grad(total, list(fast.values()), create_graph=not first_order, allow_unused=True)
        rates = rates_at(lr, names, step)
        fast = {
            name: value if grad is None else value - _scaled(rates[name], grad)
            for (name, value), grad in zip(fast.items(), grads)
        }
    return losses(fast, query_x, query_y)


class MetaLearner(Learner):
    """A model, its learned inner log-rates and the outer Adam optimiser: the machinery of every
    learner that differentiates through an inner SGD loop.

    `rate_shape` says what a rate covers: a parameter tensor ("tensor"), each element ("element",
    Meta-SGD) or a tensor at one inner step ("step", MAML++). Rates are learned in log space, so
    they stay positive, by Adam at `rate_lr`; with `learn_inner_lr=False` they stay fixed.
    """

    rate_shape: ClassVar[Literal["tensor", "element", "step"]] = "tensor"
    first_order: ClassVar[bool] = False
    task_batching: Literal["auto", "loop", "vmap"] = "auto"
    """How `step` runs the tasks of a meta-batch: one after the other ("loop": one task's graph
    alive at a time), side by side ("vmap": `batched_query_losses`, tasks of the same shapes), or
    "auto": side by side on CUDA, where a tiny network's many small kernels cost more than their
    arithmetic, one after the other on a CPU (where grouped convolutions and the padding of
    supports to the same size cost more than the loop on one core). Learners with their own
    `task_loss` (MAML++) or `step` (gradient agreement) always loop."""

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

    def batches_tasks(self) -> bool:
        """Whether `step` adapts the tasks side by side (`task_batching`)."""
        if type(self).task_loss is not MetaLearner.task_loss:
            return False
        if self.task_batching == "auto":
            return model_device(self.model).type == "cuda"
        return self.task_batching == "vmap"

    def second_order_kernels(self) -> AbstractContextManager:
        """GroupNorm's closed-form double backward (`models.second_order`) around a second-order
        step on a CPU, where it saves time; elsewhere PyTorch's own (no Python between small CUDA
        kernels, and `vmap` needs none)."""
        cpu = model_device(self.model).type == "cpu"
        return second_order_norms(self.model, enabled=cpu and not self.first_order)

    def step(self, batch: Sequence[EpisodeLike], iteration: int) -> float:
        """One outer Adam step on a meta-batch; returns its mean query loss."""
        params: Params = dict(self.model.named_parameters())
        if self.batches_tasks() and len(batch) > 1:
            return self.batched_step(params, batch, iteration)
        with self.second_order_kernels():
            return self.accumulate(batch, lambda task: self.task_loss(params, channels_last(task), iteration))

    def batched_step(self, params: Params, batch: Sequence[EpisodeLike], iteration: int) -> float:
        """`step` with the tasks of the same shapes adapted side by side (`batched_query_losses`);
        a task alone of its shapes runs on its own. One backward for the whole meta-batch."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        tasks = [task_tensors(self.model, episode) for episode in batch]
        groups: dict[tuple, list[int]] = {}
        for index, task in enumerate(tasks):
            groups.setdefault(batch_key(task), []).append(index)
        losses: dict[int, Tensor] = {}
        with autocast(model_device(self.model)):
            for members in groups.values():
                if len(members) == 1:
                    losses[members[0]] = self.task_loss(params, channels_last(tasks[members[0]]), iteration)
                    continue
                together = batched_query_losses(
                    self.model,
                    params,
                    [tasks[index] for index in members],
                    steps=self.settings.inner_steps,
                    lr=self.schedule(),
                    first_order=self.first_order,
                    only=self.only,
                )
                losses.update(zip(members, together.unbind()))
            loss = torch.stack([losses[index] for index in range(len(tasks))]).sum() / len(batch)
        loss.backward()
        self.clip_and_step()
        return loss.item()


class Maml(MetaLearner):
    """MAML (Finn et al. 2017) with learned per-tensor inner rates, second order."""

    name = "maml"


class Fomaml(MetaLearner):
    """First-order MAML: the outer gradient is the query gradient at the adapted weights."""

    name = "fomaml"
    first_order = True
