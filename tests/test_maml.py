"""MAML meta-gradients against finite differences, FOMAML, unused parameters, MetaLearner."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from models.backbones import ArchConfig, arch_preset, build_model, episode_loss
from models.learner import LearnerSettings, TaskTensors, task_tensors
from models.maml import Fomaml, Maml, MetaLearner, Params, adapt, meta_loss


def _tiny_cnn() -> nn.Module:
    """68 parameters: finite differences over each one stay cheap."""
    config = ArchConfig("classification", "cnn", in_channels=1, num_classes=4, width=4, depth=1)
    return build_model(config, seed=0)


def _task(generator: torch.Generator, dtype: torch.dtype = torch.float64) -> TaskTensors:
    """A 2-way task over global classes (3, 1): 2 support and 2 query items per class."""

    def images(count: int) -> torch.Tensor:
        return torch.randn(count, 1, 4, 4, generator=generator, dtype=dtype)

    labels = torch.tensor([0, 0, 1, 1])
    return TaskTensors(torch.tensor([3, 1]), images(4), labels, images(4), labels)


def _meta_objective(model: nn.Module, tasks: list[TaskTensors], first_order: bool):
    """The meta-loss as a function of (parameter tensors..., per-tensor inner rates)."""
    names = [name for name, _ in model.named_parameters()]

    def objective(*inputs: torch.Tensor) -> torch.Tensor:
        params, rates = dict(zip(names, inputs[:-1])), dict(zip(names, inputs[-1].unbind()))
        return meta_loss(model, params, tasks, steps=2, lr=rates, first_order=first_order)

    return names, objective


def _inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    rates = torch.full((len(params),), 0.3, dtype=torch.float64, requires_grad=True)
    return (*params, rates)


def test_second_order_meta_gradient_matches_finite_differences():
    model = _tiny_cnn().double()
    generator = torch.Generator().manual_seed(0)
    tasks = [_task(generator), _task(generator)]
    _, objective = _meta_objective(model, tasks, first_order=False)
    assert torch.autograd.gradcheck(objective, _inputs(model), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_parameters():
    model = _tiny_cnn().double()
    task = _task(torch.Generator().manual_seed(1))
    names, objective = _meta_objective(model, [task], first_order=True)
    inputs = _inputs(model)
    first = torch.autograd.grad(objective(*inputs), inputs[:-1])
    _, exact_objective = _meta_objective(model, [task], first_order=False)
    exact = torch.autograd.grad(exact_objective(*inputs), inputs[:-1])

    rates = dict(zip(names, inputs[-1].detach().unbind()))
    adapted = adapt(
        model,
        dict(zip(names, inputs[:-1])),
        task.support_x,
        task.support_y,
        task.classes,
        steps=2,
        lr=rates,
        first_order=True,
    )
    adapted = {name: value.detach().requires_grad_() for name, value in adapted.items()}
    logits = functional_call(model, adapted, (task.query_x,))
    query = episode_loss(logits, task.query_y, task.classes)
    at_adapted = torch.autograd.grad(query, [adapted[name] for name in names])

    for fomaml, expected in zip(first, at_adapted):
        torch.testing.assert_close(fomaml, expected)
    difference = sum((a - b).abs().sum() for a, b in zip(first, exact))
    assert difference > 1e-3 * sum(b.abs().sum() for b in exact)


class _WithUnused(nn.Module):
    """A head that never runs, as encoders deeper than the decoder uses leave behind."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 4)
        self.unused = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_unused_parameters_stay_put_and_get_no_meta_gradient():
    torch.manual_seed(0)
    model = _WithUnused()
    params: Params = dict(model.named_parameters())
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    adapted = adapt(model, params, x, y, torch.tensor([2, 0]), steps=2, lr=0.1)
    assert adapted["unused.weight"] is params["unused.weight"]
    assert not torch.equal(adapted["used.weight"], params["used.weight"])

    episode = SimpleNamespace(
        classes=np.array([2, 0]),
        support_images=x.numpy(),
        support_labels=y.numpy(),
        query_images=x.numpy(),
        query_labels=y.numpy(),
    )
    learner = Maml(model, LearnerSettings(inner_steps=2, inner_lr=0.1))
    before = model.unused.weight.detach().clone()
    assert np.isfinite(learner.step([episode], 0))
    assert model.unused.weight.grad is None
    assert torch.equal(model.unused.weight, before)
    assert learner.log_lrs[learner.names.index("used.weight")].grad != 0


def _episodes(rng: np.random.Generator, count: int, size: int = 8) -> list[SimpleNamespace]:
    """Separable toy 2-way episodes: the class shifts channel 0 by +-1."""
    episodes = []
    for _ in range(count):
        labels = np.array([0, 0, 1, 1])

        def images(labels: np.ndarray) -> np.ndarray:
            x = rng.normal(size=(4, 3, size, size)).astype(np.float32)
            x[:, 0] += np.where(labels == 0, -1.0, 1.0)[:, None, None]
            return x

        classes = rng.choice(5, 2, replace=False)
        episodes.append(
            SimpleNamespace(
                classes=classes,
                support_images=images(labels),
                support_labels=labels,
                query_images=images(labels),
                query_labels=labels,
            )
        )
    return episodes


def _learner(seed: int = 0, first_order: bool = False, **settings) -> MetaLearner:
    config = ArchConfig("classification", "cnn", in_channels=3, num_classes=5, width=8, depth=2)
    learner = Fomaml if first_order else Maml
    return learner(build_model(config, seed=seed), LearnerSettings(inner_steps=2, inner_lr=0.1, **settings))


def test_meta_training_lowers_the_query_loss():
    episodes = _episodes(np.random.default_rng(0), 4)
    learner = _learner(outer_lr=0.01)
    losses = [learner.step(episodes, 0) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_training_is_deterministic_under_a_seed(first_order: bool):
    def run() -> dict[str, torch.Tensor]:
        learner = _learner(first_order=first_order)
        for _ in range(3):
            learner.step(_episodes(np.random.default_rng(1), 2), 0)
        return learner.state_dict()

    first, second = run(), run()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_fixed_inner_rates_are_not_trained():
    learner = _learner(learn_inner_lr=False)
    learner.step(_episodes(np.random.default_rng(2), 2), 0)
    assert not any(rate.requires_grad for rate in learner.log_lrs)
    rates = {name: float(rate) for name, rate in learner.inner_rates().items()}
    assert rates == pytest.approx(dict.fromkeys(learner.names, 0.1))


def test_task_tensors_follow_the_model():
    model = _tiny_cnn().double()
    episode = _episodes(np.random.default_rng(3), 1)[0]
    task = task_tensors(model, episode)
    assert task.support_x.dtype == torch.float64 and task.query_y.dtype == torch.long
    assert task.classes.tolist() == episode.classes.tolist()


def test_tiny_unet_meta_step_with_sparse_support():
    """Segmentation: a support set with a few labelled pixels per tile, the rest ignored."""
    model = build_model(arch_preset("tiny", "segmentation", in_channels=4, num_classes=6), seed=0)
    rng = np.random.default_rng(4)
    support = np.full((2, 16, 16), 255)
    support[0, 3, 4], support[1, 10, 2] = 0, 1
    episode = SimpleNamespace(
        classes=np.array([5, 2]),
        support_images=rng.normal(size=(2, 4, 16, 16)).astype(np.float32),
        support_labels=support,
        query_images=rng.normal(size=(2, 4, 16, 16)).astype(np.float32),
        query_labels=rng.integers(0, 2, (2, 16, 16)),
    )
    learner = Maml(model, LearnerSettings(inner_steps=1))
    assert np.isfinite(learner.step([episode], 0))
