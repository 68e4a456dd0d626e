"""MAML++ (Antoniou et al., ICLR 2019), the parts that apply to a GroupNorm network:

- per-step, per-layer inner rates (LSLR): one learned rate per parameter tensor and inner step;
- the multi-step loss: the outer objective is a weighted sum of the query losses after every
  inner step, weights starting equal and moving to the last step over the first half of the
  run (non-final weights never below 0.03 / S), always summing to one;
- derivative-order annealing: first order for the first `second_order_from` of the run, second
  order after;
- a cosine-annealed outer rate, computed from the iteration (so a resumed run follows it).

Per-step batch-norm statistics do not apply: the backbones use GroupNorm, which has none.
At test time the network is fine-tuned with the learned per-step rates (steps beyond the
meta-trained count use the last step's), or a picked scalar rate, whichever validates better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from models.backbones import episode_loss
from models.learner import TaskTensors
from models.maml import MetaLearner, Params, trajectory

MULTI_STEP_UNTIL = 0.5
"""Fraction of the run over which the multi-step loss moves its weight to the last step."""
MIN_STEP_WEIGHT = 0.03
"""A non-final step's weight never drops below this over the step count."""


def step_weights(steps: int, progress: float) -> Tensor:
    """The multi-step loss weights at `progress` (0..1) of the run; they sum to one."""
    if steps <= 1:
        return torch.ones(max(steps, 1))
    decayed = max((1.0 - progress / MULTI_STEP_UNTIL) / steps, MIN_STEP_WEIGHT / steps)
    weights = torch.full((steps,), decayed)
    weights[-1] = 1.0 - decayed * (steps - 1)
    return weights


class MamlPlusPlus(MetaLearner):
    name = "mamlpp"
    rate_shape = "step"

    def progress(self, iteration: int) -> float:
        return min(iteration / max(self.settings.iterations, 1), 1.0)

    def second_order(self, iteration: int) -> bool:
        """First order before `second_order_from` of the run, second order from there on."""
        return self.progress(iteration) >= self.settings.second_order_from

    def task_loss(self, params: Params, task: TaskTensors, iteration: int) -> Tensor:
        path = trajectory(
            self.model,
            params,
            task.support_x,
            task.support_y,
            task.classes,
            steps=self.settings.inner_steps,
            lr=self.schedule(),
            first_order=not self.second_order(iteration),
            only=self.only,
        )
        if not path:
            return episode_loss(functional_call(self.model, params, (task.query_x,)), task.query_y, task.classes)
        weights = step_weights(len(path), self.progress(iteration)).to(task.query_x.device)
        losses = torch.stack(
            [
                episode_loss(functional_call(self.model, adapted, (task.query_x,)), task.query_y, task.classes)
                for adapted in path
            ]
        )
        return (weights * losses).sum()

    def step(self, batch, iteration: int) -> float:
        """MetaLearner's step at the cosine-annealed outer rate of this iteration."""
        factor = 0.5 * (1.0 + math.cos(math.pi * self.progress(iteration)))
        bases = (self.settings.outer_lr, self.settings.rate_lr)
        for group, base in zip(self.optimizer.param_groups, bases):
            group["lr"] = base * factor
        return super().step(batch, iteration)

    def run_fields(self) -> dict:
        return {**super().run_fields(), "first_order": False}

    @classmethod
    def test_rates(cls, saved: Mapping[str, Tensor | float]) -> Sequence[dict[str, Tensor]] | None:
        """One mapping per meta-trained inner step, from the saved (steps,) rate of each tensor."""
        if not saved:
            return None
        steps = len(torch.as_tensor(next(iter(saved.values()))).reshape(-1))
        return [
            {name: torch.as_tensor(rate).reshape(-1)[step].float() for name, rate in saved.items()}
            for step in range(steps)
        ]
