"""The `train` step: meta-train with MAML/FOMAML, or pretrain on pooled regions, into a run dir.

Training resumes: every `checkpoint_every` iterations the whole training state is saved, and a
run started again on the same directory continues from there and ends where an uninterrupted run
would. Early stopping keeps the weights of the best validation score; at the end the fine-tuning
budget is picked on the validation regions and stored with the weights.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from geo.errors import DataError
from models.backbones import arch_preset, build_model
from models.checkpoint import RunConfig, load_config, load_run, load_train_state, save_run, save_train_state
from models.device import pick_device
from models.maml import MetaLearner
from models.pretrain import pretrain_optimizer, pretrain_step
from pipeline.protocol import EpisodeShape, SplitIndex, Task, load_split_index, mean_accuracy, pick_budget
from tasks.episodes import capable_regions, episode_rng

Method = Literal["maml", "fomaml", "pretrain"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; every field is recorded in the run's config.json."""

    method: Method = "maml"
    task: Task = "segmentation"
    iterations: int = 300
    seed: int = 0
    device: str = "auto"
    size: Literal["tiny", "base"] = "tiny"
    shape: EpisodeShape = field(default_factory=EpisodeShape)
    meta_batch: int = 4
    inner_steps: int = 3
    inner_lr: float = 0.1
    learn_inner_lr: bool = True
    lr: float = 1e-3
    """Outer Adam rate (MAML) or Adam rate (pretrain)."""
    batch_size: int = 16
    """Tiles per pretraining batch."""
    validate_every: int = 25
    validation_episodes: int = 8
    patience: int = 4
    """Validations without improvement before stopping early."""
    checkpoint_every: int = 25
    init_from: str | None = None
    """A run directory whose weights start training (e.g. MAML from a pretrained model)."""

    def settings(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainSummary:
    run_dir: Path
    method: str
    iterations: int
    best_iteration: int
    validation_accuracy: float
    finetune_steps: int
    finetune_lr: float | None
    seconds: float
    iterations_per_second: float


@dataclass
class _Progress:
    """Early-stopping state, kept in config.json so a resumed run continues it."""

    best_score: float = -1.0
    best_iteration: int = 0


def train(
    index_path: Path, out_dir: Path, config: TrainConfig = TrainConfig(), *, progress: bool = True
) -> TrainSummary:
    """Train `config.method` on the train split of the index; write weights and config.json."""
    out_dir = Path(out_dir)
    data = load_split_index(index_path)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    mean, std = data.band_statistics("train")
    arch = dataclasses.replace(
        arch_preset(config.size, config.task, len(data.bands), len(data.class_names)),
        input_mean=mean, input_std=std,
    )
    model = build_model(arch, seed=config.seed).to(device)
    if config.init_from is not None:
        model.load_state_dict(_initial_weights(Path(config.init_from), arch))
    val_episodes = data.episodes(
        "val", config.task, config.shape, config.validation_episodes, seed=config.seed + 1
    )
    run_config = RunConfig(
        method=config.method, task=config.task, arch=arch,
        class_names=data.class_names, class_colors=data.class_colors, bands=data.bands,
        normalisation={"clip": [0, 10000], "divide": 10000, "uint8_divide": 255},
        seed=config.seed,
        inner_steps=config.inner_steps if config.method != "pretrain" else None,
        inner_lr=config.inner_lr if config.method != "pretrain" else None,
        learn_inner_lr=config.learn_inner_lr and config.method != "pretrain",
        first_order=config.method == "fomaml",
        settings=config.settings(),
    )
    if config.method == "pretrain":
        trainer = _PretrainTrainer(model, data, config)
    else:
        trainer = _MamlTrainer(model, data, config)
    state = _Progress(**_saved_progress(out_dir, run_config))
    start = load_train_state(out_dir, trainer.module, trainer.optimizer)
    started = time.perf_counter()
    bar = tqdm(
        total=config.iterations, initial=start, desc=f"train {config.method}",
        disable=not progress, dynamic_ncols=True,
    )
    iteration = start
    while iteration < config.iterations:
        loss = trainer.step(iteration)
        iteration += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", best=f"{state.best_score:.3f}")
        if iteration % config.validate_every == 0 or iteration == config.iterations:
            score = mean_accuracy(model, val_episodes, **trainer.validation_budget())
            if score > state.best_score:
                state = _Progress(best_score=score, best_iteration=iteration)
                _save_best(out_dir, trainer, run_config, iteration, state)
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            save_train_state(out_dir, trainer.module, trainer.optimizer, iteration)
        stale = (iteration - state.best_iteration) // config.validate_every
        if stale >= config.patience:
            break
    bar.close()
    seconds = time.perf_counter() - started
    best = load_run(out_dir, device)
    budget = pick_budget(best.model, val_episodes, learned_rates=best.inner_lrs or None)
    final = dataclasses.replace(
        load_config(out_dir), finetune_steps=budget.steps, finetune_lr=budget.lr
    )
    save_run(out_dir, best.model, final, best.inner_lrs)
    done = iteration - start
    return TrainSummary(
        run_dir=out_dir, method=config.method, iterations=iteration,
        best_iteration=state.best_iteration, validation_accuracy=state.best_score,
        finetune_steps=budget.steps, finetune_lr=budget.lr, seconds=seconds,
        iterations_per_second=done / seconds if seconds > 0 and done else 0.0,
    )


def _saved_progress(out_dir: Path, run_config: RunConfig) -> dict:
    """The early-stopping state of an earlier, interrupted run in `out_dir` (or a fresh one)."""
    if not (out_dir / "config.json").exists():
        return {}
    saved = load_config(out_dir)
    if _comparable(saved.settings) != _comparable(run_config.settings):
        raise DataError(
            out_dir, "holds a run with other settings; pick a new --out or remove it to start over"
        )
    return {"best_score": saved.validation_accuracy or -1.0, "best_iteration": saved.iterations}


def _initial_weights(run_dir: Path, arch) -> dict:
    """The weights of another run, which must have the same architecture and input statistics."""
    start = load_run(run_dir)
    if start.config.arch != arch:
        raise DataError(run_dir, "has another architecture or input statistics than this run")
    return start.model.state_dict()


def _comparable(settings: dict) -> dict:
    """Settings that must match to resume: more iterations or another device may continue a run."""
    return {key: value for key, value in settings.items() if key not in ("iterations", "device")}


def _save_best(
    out_dir: Path, trainer: _Trainer, run_config: RunConfig, iteration: int, state: _Progress
) -> None:
    config = dataclasses.replace(
        run_config, iterations=iteration, validation_accuracy=state.best_score
    )
    save_run(out_dir, trainer.model, config, trainer.inner_rates())


class _Trainer:
    """What the training loop needs of a method: one step, the module to checkpoint, rates."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, iteration: int) -> float:
        raise NotImplementedError

    def inner_rates(self) -> dict[str, float]:
        return {}

    def validation_budget(self) -> dict:
        raise NotImplementedError


class _MamlTrainer(_Trainer):
    """MAML/FOMAML: one outer step on a meta-batch of train episodes per iteration."""

    def __init__(self, model: nn.Module, data: SplitIndex, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self.learner = MetaLearner(
            model, steps=config.inner_steps, inner_lr=config.inner_lr,
            learn_inner_lr=config.learn_inner_lr, first_order=config.method == "fomaml",
            outer_lr=config.lr,
        )
        self.module, self.optimizer = self.learner, self.learner.optimizer
        self.sampler = data.sampler("train", config.task, config.shape)
        self.regions = capable_regions(self.sampler, sorted(data.split("train")["region"].unique()))
        if not self.regions:
            raise DataError(data.path, "no train region can supply a meta-training episode")

    def step(self, iteration: int) -> float:
        rng = np.random.default_rng([self.config.seed, iteration])
        chosen = rng.choice(self.regions, size=self.config.meta_batch)
        episodes = [
            self.sampler.sample(str(region), episode_rng(self.config.seed, str(region), iteration * 64 + slot))
            for slot, region in enumerate(chosen)
        ]
        return self.learner.meta_train_step(episodes)

    def inner_rates(self) -> dict[str, float]:
        return {name: float(rate) for name, rate in self.learner.inner_lrs().items()}

    def validation_budget(self) -> dict:
        return {"steps": self.config.inner_steps, "lr": self.inner_rates()}


class _PretrainTrainer(_Trainer):
    """Pretraining: one supervised Adam step on tiles pooled from every train region."""

    def __init__(self, model: nn.Module, data: SplitIndex, config: TrainConfig) -> None:
        self.model, self.config, self.data = model, config, data
        self.module, self.optimizer = model, pretrain_optimizer(model, config.lr)
        rows = data.split("train")
        if config.task == "classification":
            rows = rows[rows["majority_class"] >= 0]
        if rows.empty:
            raise DataError(data.path, "the train split has no labelled tiles")
        self.positions = rows.index.to_numpy()
        self.majority = rows["majority_class"].to_numpy()

    def step(self, iteration: int) -> float:
        rng = np.random.default_rng([self.config.seed, iteration])
        picked = rng.choice(len(self.positions), size=self.config.batch_size)
        positions = self.positions[picked]
        images = self.data.tiles.images(positions)
        if self.config.task == "classification":
            labels = self.majority[picked]
        else:
            labels = self.data.tiles.masks(positions).astype(np.int64)
        return pretrain_step(self.model, self.optimizer, images, labels)

    def validation_budget(self) -> dict:
        return {"steps": self.config.inner_steps, "lr": self.config.inner_lr}

