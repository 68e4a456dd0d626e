"""What a training method is to the rest of `landcover`: one small interface, so that adding a
learner is one module under `models/` plus one line in `models.learners.LEARNERS`.

A learner wraps the network it trains and gives
- `step(batch, iteration)`: one outer (meta-)training step; `batch` is a meta-batch of episodes
  (`episodic = True`) or, for supervised learners, `(images, labels)` on global class ids;
- its test-time adaptation (`adaptation`): how a trained network turns a support set into a
  classifier: fine-tuning all weights or only the last layer by SGD at a picked budget, a ridge
  head in closed form, or class prototypes; `pipeline.candidates` builds the predictor from it;
- what it saves beside the weights: `inner_rates()` (learned inner-loop rates, in weights.pt) and
  `run_fields()` (learned or fixed settings that adaptation needs, in config.json). `module` and
  `optimizer` are what a resumable checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from models.device import as_images, as_labels, autocast, model_device

Adaptation = Literal["finetune", "finetune-head", "ridge", "prototypes"]
"""Test-time adaptation kinds: SGD on every weight or on the last layer only (budget picked on
validation), a closed-form ridge head, or nearest class prototypes (no budget)."""
FINETUNE_ADAPTATIONS: tuple[Adaptation, ...] = ("finetune", "finetune-head")


class EpisodeLike(Protocol):
    """What learners read of `tasks.episodes.Episode` (models does not import tasks)."""

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


@dataclass(frozen=True)
class LearnerSettings:
    """Settings every learner reads; each uses those that apply to it (see `landcover train -h`)."""

    inner_steps: int = 3
    inner_lr: float = 0.01
    """Initial inner SGD rate. 0.1 diverges on the U-Net (3 steps raise a pretrained model's
    support loss 0.71 -> 1.85), and a diverging inner loop gives MAML nothing to learn."""
    learn_inner_lr: bool = True
    outer_lr: float = 1e-3
    rate_lr: float = 0.03
    """Adam rate of learned log inner rates: at `outer_lr` they move ~0.1% a step."""
    iterations: int = 300
    """The run's length: MAML++ and Reptile anneal over it."""
    max_grad_norm: float = 10.0
    reptile_step: float = 1.0
    """Reptile's outer step size: the fraction of the way to the tasks' adapted weights, annealed
    linearly to 0 over the run (Nichol et al. 2018)."""
    reptile_inner_lr: float = 0.05
    """Reptile's inner SGD rate: its update is the inner loop's displacement, so the inner loop
    must move the weights (MAML's 0.01 for 3 steps barely does)."""
    second_order_from: float = 0.5
    """MAML++: the fraction of the run trained first-order before second-order gradients start."""


Batch = Sequence[EpisodeLike] | tuple[np.ndarray, np.ndarray]


class Learner(nn.Module):
    """A network, what the learner learns beside it, and its outer optimiser."""

    name: ClassVar[str]
    adaptation: ClassVar[Adaptation] = "finetune"
    episodic: ClassVar[bool] = True
    """True: `step` takes a meta-batch of episodes; False: a supervised `(images, labels)` batch."""
    optimizer: torch.optim.Optimizer

    def __init__(self, model: nn.Module, settings: LearnerSettings) -> None:
        super().__init__()
        self.model, self.settings = model, settings

    def step(self, batch: Any, iteration: int) -> float:
        """One outer step; returns its training loss."""
        raise NotImplementedError

    def inner_rates(self) -> dict[str, Tensor]:
        """Learned inner rates saved with the weights ({} for none)."""
        return {}

    @classmethod
    def test_rates(
        cls, saved: Mapping[str, Tensor | float]
    ) -> Mapping[str, Tensor | float] | Sequence[Mapping[str, Tensor | float]] | None:
        """The rates test-time fine-tuning uses from saved `inner_rates()` (None: a picked scalar)."""
        return dict(saved) or None

    def run_fields(self) -> dict[str, Any]:
        """Fields of the run's config.json that adaptation needs (`models.checkpoint.RunConfig`)."""
        return {}

    def accumulate(self, batch: Sequence[EpisodeLike], task_loss: Callable[[TaskTensors], Tensor]) -> float:
        """One outer step on the mean of `task_loss` over a meta-batch; returns that mean.

        Each task is backpropagated on its own (gradients accumulate), so only one task's graph
        (a second-order one, for MAML) is alive at a time.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        device, total = model_device(self.model), 0.0
        for episode in batch:
            with autocast(device):
                loss = task_loss(task_tensors(self.model, episode)) / len(batch)
            loss.backward()
            total += loss.item()
        self.clip_and_step()
        return total

    def clip_and_step(self) -> None:
        """The outer update: gradient-norm clipping, then the optimiser."""
        torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.requires_grad], self.settings.max_grad_norm)
        self.optimizer.step()
