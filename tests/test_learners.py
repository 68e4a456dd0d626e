"""The defining rule of each meta-learner, checked on toy problems whose answer is known:
Reptile's interpolation, ANIL's head-only inner loop, Meta-SGD's per-element rates, MAML++'s
multi-step loss and derivative-order annealing, gradient agreement's task weights, ProtoNet's
prototype distances, and finite-difference checks of the second-order meta-gradients."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from models.anil import Anil
from models.backbones import ArchConfig, build_model, episode_loss, last_layer_names
from models.learner import Learner, LearnerSettings, TaskTensors, task_tensors
from models.maml import Maml, MetaLearner, Params, query_loss, trajectory
from models.maml_ga import MamlGa, agreement_weights
from models.mamlpp import MIN_STEP_WEIGHT, MamlPlusPlus, step_weights
from models.metasgd import MetaSgd
from models.protonet import prototype_head, prototype_logits, prototypes
from models.reptile import Reptile

L = TypeVar("L", bound=Learner)


def _tiny_cnn() -> nn.Module:
    """68 parameters: finite differences over each one stay cheap."""
    config = ArchConfig("classification", "cnn", in_channels=1, num_classes=4, width=4, depth=1)
    return build_model(config, seed=0)


def _learner(kind: type[L], **settings: Any) -> L:
    """`kind` on the tiny cnn in float64 (rates too), 2 inner steps at rate 0.1 unless told
    (`settings`: fields of `LearnerSettings`)."""
    defaults: dict[str, Any] = {"inner_steps": 2, "inner_lr": 0.1}
    return kind(_tiny_cnn(), LearnerSettings(**{**defaults, **settings})).double()


def _grad(parameter: Tensor) -> Tensor:
    assert parameter.grad is not None
    return parameter.grad


def _episodes(seed: int, count: int) -> list[SimpleNamespace]:
    """2-way episodes of 4x4 one-band tiles over 2 of the tiny cnn's 4 classes, 2 items a class."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 1, 1])
    return [
        SimpleNamespace(
            classes=rng.choice(4, 2, replace=False),
            support_images=rng.normal(size=(4, 1, 4, 4)),
            support_labels=labels,
            query_images=rng.normal(size=(4, 1, 4, 4)),
            query_labels=labels,
        )
        for _ in range(count)
    ]


def _tasks(model: nn.Module, episodes: Sequence[SimpleNamespace]) -> list[TaskTensors]:
    return [task_tensors(model, episode) for episode in episodes]


def _weights(model: nn.Module) -> Params:
    """A detached copy of the model's parameters, to compare against after a step."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, task: TaskTensors) -> Tensor:
    return episode_loss(functional_call(model, params, (x,)), y, task.classes)


def _relative_difference(first: Sequence[Tensor], second: Sequence[Tensor]) -> float:
    difference = sum(float((a - b).abs().sum()) for a, b in zip(first, second))
    return difference / sum(float(b.abs().sum()) for b in second)


# Reptile


@pytest.mark.parametrize(("iteration", "eps"), [(0, 0.8), (3, 0.2), (4, 0.0)])
def test_reptile_moves_eps_of_the_way_to_the_mean_adapted_weights(iteration: int, eps: float):
    """theta <- theta + eps * (mean_i phi_i - theta), eps = 0.8 * (1 - iteration / 4)."""
    learner = _learner(Reptile, reptile_inner_lr=0.1, reptile_step=0.8, iterations=4)
    episodes = _episodes(0, 3)
    start = _weights(learner.model)
    adapted = [learner.fit_task(start, task)[0] for task in _tasks(learner.model, episodes)]
    assert learner.outer_step_size(iteration) == pytest.approx(eps)

    learner.step(episodes, iteration)
    for name, parameter in learner.model.named_parameters():
        mean = torch.stack([phi[name] for phi in adapted]).mean(dim=0)
        expected = start[name] + eps * (mean - start[name])
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-12, atol=1e-12, msg=name)
    moved = _relative_difference(list(_weights(learner.model).values()), list(start.values()))
    assert (moved > 1e-4) == (eps > 0)


def test_reptile_inner_step_is_sgd_on_support_plus_query_loss():
    """One inner step: phi = theta - lr * grad(L_support + L_query), the gradient by hand."""
    learner = _learner(Reptile, inner_steps=1, reptile_inner_lr=0.1)
    model = learner.model
    task = _tasks(model, _episodes(1, 1))[0]
    params: Params = dict(model.named_parameters())
    support = _loss(model, params, task.support_x, task.support_y, task)
    loss = support + _loss(model, params, task.query_x, task.query_y, task)
    grads = torch.autograd.grad(loss, list(params.values()))
    adapted, first = learner.fit_task(_weights(model), task)
    assert first == pytest.approx(loss.item())
    for (name, value), grad in zip(params.items(), grads):
        torch.testing.assert_close(adapted[name], value.detach() - 0.1 * grad, msg=name)


# ANIL


def test_anil_inner_loop_adapts_only_the_last_layer_and_the_body_still_learns():
    learner = _learner(Anil, inner_lr=0.5)
    model = learner.model
    head = last_layer_names(model)
    assert learner.names == ["head.weight", "head.bias"] and set(learner.names) == head
    assert learner.only == head and len(learner.log_lrs) == 2

    episodes = _episodes(2, 2)
    task = _tasks(model, episodes)[0]
    params: Params = dict(model.named_parameters())
    path = trajectory(
        model,
        params,
        task.support_x,
        task.support_y,
        task.classes,
        steps=2,
        lr=learner.schedule(),
        only=learner.only,
    )
    for adapted in path:
        for name, value in params.items():
            if name in head:
                assert not torch.equal(adapted[name], value), name
            else:
                assert adapted[name] is value, f"the inner loop touched body parameter {name}"

    before = _weights(model)
    learner.step(episodes, 0)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert not torch.equal(parameter.detach(), before[name]), name


# Meta-SGD


def test_metasgd_learns_one_rate_per_parameter_element():
    """Each element's rate gets its own gradient; Adam's first step moves exactly the non-zero."""
    learner = _learner(MetaSgd)
    shapes = {name: p.shape for name, p in learner.model.named_parameters()}
    assert learner.names == list(shapes)
    assert [rate.shape for rate in learner.log_lrs] == list(shapes.values())

    before = [rate.detach().clone() for rate in learner.log_lrs]
    learner.step(_episodes(3, 2), 0)
    for name, rate, old in zip(learner.names, learner.log_lrs, before):
        assert rate.grad is not None and rate.grad.shape == rate.shape, name
        assert rate.grad.count_nonzero() > 0, name
        if rate.numel() > 1:
            assert not torch.all(rate.grad == rate.grad.flatten()[0]), f"{name}: one gradient for all elements"
        zero = rate.grad == 0
        assert torch.equal(rate.detach()[zero], old[zero]), name
        assert torch.all(rate.detach()[~zero] != old[~zero]), name


# MAML++


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_mamlpp_step_weights_start_equal_move_to_the_last_step_and_sum_to_one(steps: int):
    """Non-final weights (1 - 2 progress) / S, floored at 0.03 / S; the last takes the rest."""
    floor = MIN_STEP_WEIGHT / steps
    finals = []
    for progress in (0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 1.0):
        weights = step_weights(steps, progress)
        assert weights.shape == (steps,)
        assert float(weights.sum()) == pytest.approx(1.0)
        assert torch.all(weights[:-1] >= floor * (1 - 1e-6))
        finals.append(float(weights[-1]))
    torch.testing.assert_close(step_weights(steps, 0.0), torch.full((steps,), 1.0 / steps))
    if steps > 1:
        rising, settled = finals[:4], finals[4:]
        assert all(a < b for a, b in pairwise(rising)), rising
        assert settled == pytest.approx([1.0 - (steps - 1) * floor] * 3)
        assert float(step_weights(steps, 0.25)[0]) == pytest.approx(0.5 / steps)


def test_mamlpp_rates_are_per_step_and_second_order_starts_on_schedule():
    learner = _learner(MamlPlusPlus, inner_steps=3, iterations=10, second_order_from=0.5)
    assert [learner.second_order(i) for i in range(12)] == [i >= 5 for i in range(12)]
    assert all(rate.shape == (3,) for rate in learner.log_lrs)
    with torch.no_grad():
        for rate in learner.log_lrs:
            rate.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3])))
    schedule = learner.schedule()
    assert len(schedule) == 3
    for step, rates in enumerate(schedule):
        assert set(rates) == set(learner.names)
        assert all(float(rate.detach()) == pytest.approx(0.1 * (step + 1)) for rate in rates.values())


def _first_order_gradient(
    model: nn.Module, params: Params, task: TaskTensors, schedule: Sequence[Params], weights: Tensor
) -> list[Tensor]:
    """sum_s w_s grad L_query(phi_s): the inner SGD path phi_s taken as theta plus a constant."""
    phi = {name: value.detach().requires_grad_() for name, value in params.items()}
    total = [torch.zeros_like(value) for value in phi.values()]
    for rates, weight in zip(schedule, weights):
        grads = torch.autograd.grad(_loss(model, phi, task.support_x, task.support_y, task), list(phi.values()))
        phi = {
            name: (value - rates[name].detach() * grad).detach().requires_grad_()
            for (name, value), grad in zip(phi.items(), grads)
        }
        query = torch.autograd.grad(_loss(model, phi, task.query_x, task.query_y, task), list(phi.values()))
        total = [t + weight * g for t, g in zip(total, query)]
    return total


@pytest.mark.parametrize(("iteration", "second_order"), [(0, False), (4, False), (5, True), (8, True)])
def test_mamlpp_meta_gradient_is_first_order_early_and_second_order_late(iteration: int, second_order: bool):
    """Before half the run the weighted multi-step gradient is exactly the first-order one."""
    learner = _learner(MamlPlusPlus, inner_steps=3, iterations=10, second_order_from=0.5)
    model = learner.model
    task = _tasks(model, _episodes(4, 1))[0]
    params: Params = dict(model.named_parameters())
    exact = torch.autograd.grad(learner.task_loss(params, task, iteration), list(params.values()))
    weights = step_weights(3, iteration / 10)
    first = _first_order_gradient(model, params, task, learner.schedule(), weights)
    if second_order:
        assert _relative_difference(exact, first) > 1e-3, "no second-order term"
    else:
        for name, a, b in zip(params, exact, first):
            torch.testing.assert_close(a, b, msg=name)


# Gradient agreement


def test_agreement_weights_follow_the_formula_on_hand_made_gradients():
    """g = (1,0), (1,1), (-1,0.5): G = (1,1.5), g.G = 1, 2.5, -0.25, sum |g.G| = 3.75."""
    gradients = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=torch.float64)
    weights = agreement_weights(gradients)
    torch.testing.assert_close(weights, torch.tensor([1.0, 2.5, -0.25], dtype=torch.float64) / 3.75)
    assert weights[2] < 0

    same = torch.tensor([[0.3, -2.0, 1.0]] * 4)
    torch.testing.assert_close(agreement_weights(same), torch.full((4,), 0.25))
    torch.testing.assert_close(agreement_weights(torch.zeros(3, 5)), torch.full((3,), 1 / 3))


def test_maml_ga_step_equals_maml_on_identical_tasks():
    """Identical tasks agree, so their weights are 1/n: the step is MAML's mean-gradient step."""
    batch = _episodes(5, 1) * 3
    learners = [_learner(kind) for kind in (Maml, MamlGa)]
    losses = [learner.step(batch, 0) for learner in learners]
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    maml, ga = (learner.state_dict() for learner in learners)
    assert not torch.equal(maml["model.head.weight"], _tiny_cnn().get_parameter("head.weight").double())
    for name in maml:
        torch.testing.assert_close(ga[name], maml[name], msg=name)


def test_maml_ga_step_follows_the_agreement_weighted_gradient():
    """Distinct tasks: the gradient stepped along is sum_i w_i g_i of the tasks' own gradients."""
    learner = _learner(MamlGa, max_grad_norm=1e9)
    episodes = _episodes(6, 3)
    params: Params = dict(learner.model.named_parameters())
    trained = [p for p in learner.parameters() if p.requires_grad]
    rows = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(learner.task_loss(params, task, 0), trained)])
            for task in _tasks(learner.model, episodes)
        ]
    )
    weights = agreement_weights(rows)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 3), atol=1e-3)
    learner.step(episodes, 0)
    stepped = torch.cat([_grad(p).reshape(-1) for p in trained])
    torch.testing.assert_close(stepped, weights @ rows, rtol=1e-10, atol=1e-12)


# ProtoNet


def _negative_squared_distances(values: np.ndarray, means: np.ndarray) -> np.ndarray:
    """-|v - c_k|^2 of (n, F) rows to (K, F) means: (n, K)."""
    return -((values[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)


def _toy_prototypes() -> tuple[np.ndarray, Tensor, Tensor]:
    """Support rows of classes 0 and 1 of 3 (class 2 has none): numpy's means, the library's."""
    rows = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0], [1.0, 3.0]])
    labels = np.array([0, 0, 1, 1, 1])
    expected = np.array([rows[labels == k].mean(axis=0) for k in (0, 1)])
    means, present = prototypes(torch.tensor(rows), torch.tensor(labels), 3)
    return expected, means, present


QUERIES = np.array([[1.0, 1.0], [0.0, 0.0], [3.0, -1.0]])


def test_prototypes_are_class_means_and_logits_negative_squared_distances():
    expected, means, present = _toy_prototypes()
    np.testing.assert_allclose(means[:2].numpy(), expected)
    assert present.tolist() == [True, True, False]

    logits = prototype_logits(torch.tensor(QUERIES), means, present).numpy()
    np.testing.assert_allclose(logits[:, :2], _negative_squared_distances(QUERIES, expected), rtol=1e-6)
    assert np.all(np.isneginf(logits[:, 2]))


def test_prototype_logits_of_feature_maps_are_per_pixel_distances_on_axis_1():
    expected, means, present = _toy_prototypes()
    maps = np.random.default_rng(7).normal(size=(2, 2, 3, 5))
    logits = prototype_logits(torch.tensor(maps), means, present).numpy()
    assert logits.shape == (2, 3, 3, 5)
    pixels = maps.transpose(0, 2, 3, 1).reshape(-1, 2)
    by_pixel = _negative_squared_distances(pixels, expected).reshape(2, 3, 5, 2).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(logits[:, :2], by_pixel, rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(logits[:, 2]))


def test_prototype_head_is_the_distance_softmax():
    """x.2c - |c|^2 = -|x - c|^2 + |x|^2: the same softmax, the logits shifted by |x|^2."""
    means = _toy_prototypes()[1][:2].float()
    queries = torch.tensor(QUERIES, dtype=torch.float32)
    weight, bias = prototype_head(means)
    assert weight.shape == (2, 2) and bias.shape == (2,)
    linear = queries @ weight + bias
    distances = prototype_logits(queries, means)
    torch.testing.assert_close(linear - distances, (queries**2).sum(dim=1, keepdim=True).expand(-1, 2))
    torch.testing.assert_close(linear.softmax(dim=1), distances.softmax(dim=1))


# Second-order meta-gradients against finite differences

STEPS = 2
PROGRESS = 0.25
"""MAML++ at a quarter of the run: step weights 1/4, 3/4, and (from 0.25 on) second order."""
TaskLoss = Callable[[nn.Module, Params, Sequence[Tensor], TaskTensors], Tensor]


def _metasgd_loss(model: nn.Module, params: Params, rates: Sequence[Tensor], task: TaskTensors) -> Tensor:
    """The query loss after second-order steps at one rate per element (a per-element tensor)."""
    return query_loss(model, params, task, steps=STEPS, lr=dict(zip(params, rates)))


def _mamlpp_loss(model: nn.Module, params: Params, rates: Sequence[Tensor], task: TaskTensors) -> Tensor:
    """sum_s w_s L_query(phi_s) over second-order steps at (steps,) rates per tensor."""
    schedule = [{name: rate[step] for name, rate in zip(params, rates)} for step in range(STEPS)]
    path = trajectory(model, params, task.support_x, task.support_y, task.classes, steps=STEPS, lr=schedule)
    losses = torch.stack([_loss(model, phi, task.query_x, task.query_y, task) for phi in path])
    return (step_weights(STEPS, PROGRESS).double() * losses).sum()


def _meta_objective(learner: MetaLearner, tasks: Sequence[TaskTensors], loss: TaskLoss) -> Callable[..., Tensor]:
    """The mean task loss as a function of (weights..., log-rates...), the learner's tensors."""
    names = [name for name, _ in learner.model.named_parameters()]

    def objective(*inputs: Tensor) -> Tensor:
        params = dict(zip(names, inputs[: len(names)]))
        rates = [log_rate.exp() for log_rate in inputs[len(names) :]]
        return torch.stack([loss(learner.model, params, rates, task) for task in tasks]).mean()

    return objective


@pytest.mark.parametrize(
    ("kind", "loss"), [(MetaSgd, _metasgd_loss), (MamlPlusPlus, _mamlpp_loss)], ids=["metasgd", "mamlpp"]
)
def test_second_order_meta_gradient_matches_finite_differences(kind: type[MetaLearner], loss: TaskLoss):
    """The objective is the learner's own (same value at its tensors); its autograd gradient,
    through inner steps at per-element or per-step rates, matches finite differences."""
    iterations = 8
    learner = _learner(kind, inner_steps=STEPS, iterations=iterations, second_order_from=PROGRESS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for log_rate in learner.log_lrs:
            log_rate.uniform_(math.log(0.1), math.log(0.4), generator=generator)
    tasks = _tasks(learner.model, _episodes(8, 2))
    objective = _meta_objective(learner, tasks, loss)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (*learner.model.parameters(), *learner.log_lrs))

    params: Params = dict(learner.model.named_parameters())
    iteration = round(PROGRESS * iterations)
    own = torch.stack([learner.task_loss(params, task, iteration) for task in tasks]).mean()
    torch.testing.assert_close(objective(*inputs), own)
    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
