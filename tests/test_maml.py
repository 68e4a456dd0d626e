"""MAML meta-gradients against finite differences, FOMAML, unused parameters, MetaLearner, and the
faster meta-step (labelled-pixel loss, tasks side by side, GroupNorm's double backward) against the
plain one."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from models.anil import Anil
from models.backbones import ArchConfig, arch_preset, build_model, episode_loss
from models.learner import LearnerSettings, TaskTensors, task_tensors
from models.maml import Fomaml, Maml, MetaLearner, Params, adapt, labelled_loss, meta_loss
from models.mamlpp import MamlPlusPlus
from models.metasgd import MetaSgd
from models.second_order import group_norm


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


# The faster meta-step: labelled-pixel loss, tasks side by side, GroupNorm's double backward


def test_labelled_loss_is_the_episode_loss_with_its_gradient():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 8, 8, dtype=torch.float64, generator=generator)
    classes = torch.tensor([4, 1, 2])
    sparse = torch.full((3, 8, 8), 255)
    sparse[0, 1, 2], sparse[1, 5, 5], sparse[2, 7, 0], sparse[2, 3, 3] = 0, 2, 1, 1
    dense = torch.randint(0, 3, (3, 8, 8), generator=generator)
    for labels in (sparse, dense, torch.full((3, 8, 8), 255)):
        first, second = (logits.clone().requires_grad_() for _ in range(2))
        ours, reference = labelled_loss(first, labels, classes), episode_loss(second, labels, classes)
        torch.testing.assert_close(ours, reference)
        ours.backward(), reference.backward()
        torch.testing.assert_close(first.grad, second.grad)
    items = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(
        labelled_loss(items, torch.tensor([0, 2, 1, 0]), classes),
        episode_loss(items, torch.tensor([0, 2, 1, 0]), classes),
    )


def _segmentation_episodes(count: int, sizes: list[int], n_way: int = 3) -> list[SimpleNamespace]:
    """Sparse segmentation episodes on 16 px tiles: `sizes` support tiles each, 2 query tiles."""
    rng = np.random.default_rng(6)
    episodes = []
    for index in range(count):
        tiles = sizes[index % len(sizes)]
        support = np.full((tiles, 16, 16), 255)
        for label in range(n_way):
            support.flat[rng.choice(support.size, 3, replace=False)] = label
        episodes.append(
            SimpleNamespace(
                classes=np.sort(rng.choice(6, n_way, replace=False)),
                support_images=rng.normal(size=(tiles, 4, 16, 16)),
                support_labels=support,
                query_images=rng.normal(size=(2, 4, 16, 16)),
                query_labels=rng.integers(0, n_way, (2, 16, 16)),
            )
        )
    return episodes


def _step_gradients(
    kind: type[MetaLearner], batching: str, batch: list, **settings
) -> tuple[float, list[torch.Tensor]]:
    model = build_model(arch_preset("tiny", "segmentation", in_channels=4, num_classes=6), seed=0)
    learner = kind(model, LearnerSettings(inner_steps=2, inner_lr=0.05, max_grad_norm=1e9, **settings)).double()
    learner.task_batching = batching  # type: ignore[assignment]
    loss = learner.step(batch, 0)
    return loss, [torch.zeros_like(p) if p.grad is None else p.grad for p in learner.parameters()]


@pytest.mark.parametrize("kind", [Maml, Fomaml, MetaSgd, Anil], ids=["maml", "fomaml", "metasgd", "anil"])
def test_tasks_side_by_side_give_the_loop_s_loss_and_meta_gradient(kind: type[MetaLearner]):
    """Tasks of different support sizes (padded) and one of another class count (on its own)."""
    batch = _segmentation_episodes(3, [1, 3, 2]) + _segmentation_episodes(1, [2], n_way=2)
    loop_loss, loop = _step_gradients(kind, "loop", batch)
    side_loss, side = _step_gradients(kind, "vmap", batch)
    assert side_loss == pytest.approx(loop_loss, rel=1e-12)
    for ours, reference in zip(side, loop):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in loop) > 0


def test_auto_batching_loops_on_a_cpu_and_for_learners_with_their_own_task_loss():
    model = build_model(arch_preset("tiny", "segmentation", in_channels=4, num_classes=6), seed=0)
    assert not Maml(model).batches_tasks()
    maml = Maml(model)
    maml.task_batching = "vmap"
    assert maml.batches_tasks()
    mamlpp = MamlPlusPlus(model)
    mamlpp.task_batching = "vmap"
    assert not mamlpp.batches_tasks()


@pytest.mark.parametrize(
    ("groups", "layout"), [(1, torch.contiguous_format), (1, torch.channels_last), (2, torch.channels_last)]
)
def test_group_norm_has_pytorch_s_first_and_second_derivatives(groups: int, layout: torch.memory_format):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=generator).contiguous(memory_format=layout)
    weight, bias = (torch.randn(4, dtype=torch.float64, generator=generator) for _ in range(2))
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    torch.testing.assert_close(group_norm(x, groups, weight, bias), F.group_norm(x, groups, weight, bias))
    assert torch.autograd.gradgradcheck(lambda *t: group_norm(t[0], groups, t[1], t[2]), inputs)
    # the first layer of a network: the input needs no gradient
    assert torch.autograd.gradgradcheck(lambda w, b: group_norm(x.detach(), groups, w, b), inputs[1:])


def test_second_order_step_is_the_same_with_pytorch_s_group_norm():
    batch = _segmentation_episodes(2, [1, 2])
    loss, ours = _step_gradients(Maml, "loop", batch)
    with patch.object(MetaLearner, "second_order_kernels", lambda self: contextlib.nullcontext()):
        reference_loss, reference = _step_gradients(Maml, "loop", batch)
    assert loss == pytest.approx(reference_loss, rel=1e-12)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
