"""The `train` step: meta-train with MAML/FOMAML or through a closed-form ridge head (R2-D2), or
pretrain on pooled regions, into a run dir.

Training resumes: every `checkpoint_every` iterations the whole training state is saved, and a
run started again on the same directory continues from there and ends where an uninterrupted run
would. Early stopping keeps the weights of the best validation score; at the end the fine-tuning
budget is picked on the validation regions and stored with the weights.
"""
from __future__ import annotations

import dataclasses
import json
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
from models.checkpoint import (
    CONFIG,
    LoadedRun,
    RunConfig,
    load_config,
    load_run,
    load_train_state,
    save_run,
    save_train_state,
)
from models.device import pick_device
from models.maml import MetaLearner
from models.pretrain import pretrain_optimizer, pretrain_step
from models.r2d2 import RidgeMetaLearner
from pipeline.candidates import HeadCandidate
from pipeline.protocol import (
    SCENE_FINETUNE_STEPS,
    SCENE_SHOTS,
    Budget,
    EpisodeShape,
    SplitIndex,
    Task,
    load_split_index,
    mean_accuracy,
    mean_candidate_accuracy,
    pick_budget,
)
from tasks.episodes import Episode, capable_regions, episode_rng

Method = Literal["maml", "fomaml", "r2d2", "pretrain"]
METHODS: tuple[str, ...] = ("maml", "fomaml", "r2d2", "pretrain")
INNER_LOOP_METHODS = ("maml", "fomaml")


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
    inner_lr: float = 0.01
    """Initial inner SGD rate. 0.1 diverges on the U-Net (3 steps raise a pretrained model's
    support loss 0.71 -> 1.85), and a diverging inner loop gives MAML nothing to learn."""
    learn_inner_lr: bool = True
    lr: float = 1e-3
    """Outer Adam rate (MAML) or Adam rate (pretrain)."""
    rate_lr: float = 0.03
    """Outer Adam rate of the learned log inner rates: at `lr` they move ~0.1% a step and stay
    at their initial value through a demo-length run."""
    batch_size: int = 16
    """Tiles per pretraining batch."""
    validate_every: int = 25
    validation_episodes: int = 8
    patience: int = 4
    """Validations without improvement before stopping early."""
    checkpoint_every: int = 25
    init_from: str | None = None
    """A run directory whose weights start training (e.g. MAML from a pretrained model)."""

    def __post_init__(self) -> None:
        """Reject impossible settings at once (the flow config reports them by key)."""
        choices = {
            "method": METHODS,
            "task": ("classification", "segmentation"),
            "size": ("tiny", "base"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        at_least = {
            "iterations": 1, "validate_every": 1, "validation_episodes": 1, "patience": 1,
            "checkpoint_every": 1, "meta_batch": 1, "batch_size": 1, "inner_steps": 0,
        }
        for name, least in at_least.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        if self.inner_lr <= 0 or self.lr <= 0 or self.rate_lr <= 0:
            raise ValueError(f"inner_lr and lr must be positive, got {self.inner_lr} and {self.lr}")
        if self.shape.k_shot < 1 or (self.task == "classification" and self.shape.q_queries < 1):
            raise ValueError(
                "shape: training episodes need at least 1 shot (and, for classification, 1 query)"
            )

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
    resumed_from: int = 0
    """The iteration an interrupted run in the same directory had reached (0: a fresh start)."""


@dataclass
class _Progress:
    """Early-stopping state, kept in config.json so a resumed run continues it."""

    best_score: float = -1.0
    best_iteration: int = 0


def train(
    index_path: Path, out_dir: Path, config: TrainConfig = TrainConfig(), *, progress: bool = True
) -> TrainSummary:
    """Train `config.method` on the train split of the index; write weights and config.json.

    A directory that already holds a run with the same settings continues it (from its last
    checkpoint) and ends with the weights an uninterrupted run would have; one with other
    settings is refused before anything is written.
    """
    out_dir = Path(out_dir)
    data = load_split_index(index_path)
    mean, std = data.band_statistics("train")
    arch = dataclasses.replace(
        arch_preset(config.size, config.task, len(data.bands), len(data.class_names)),
        input_mean=mean, input_std=std,
    )
    run_config = RunConfig(
        method=config.method, task=config.task, arch=arch,
        class_names=data.class_names, class_colors=data.class_colors, bands=data.bands,
        normalisation={"clip": [0, 10000], "divide": 10000, "uint8_divide": 255},
        seed=config.seed,
        inner_steps=config.inner_steps if config.method in INNER_LOOP_METHODS else None,
        inner_lr=config.inner_lr if config.method in INNER_LOOP_METHODS else None,
        learn_inner_lr=config.learn_inner_lr and config.method in INNER_LOOP_METHODS,
        first_order=config.method == "fomaml",
        settings=config.settings(),
    )
    saved = _saved_progress(out_dir, run_config)  # refuse a foreign run before any work
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(arch, seed=config.seed).to(device)
    if config.init_from is not None:
        model.load_state_dict(_initial_weights(Path(config.init_from), arch))
    val_episodes = data.episodes(
        "val", config.task, config.shape, config.validation_episodes, seed=config.seed + 1
    )
    trainer = _TRAINERS[config.method](model, data, config)
    if saved is None:
        # claim the directory at once: a kill before the first validation still leaves the
        # settings that a restart is checked against
        save_run(out_dir, trainer.model, run_config, trainer.inner_rates())
        saved = _Progress()
    state = saved
    start = load_train_state(out_dir, trainer.module, trainer.optimizer)
    if start > config.iterations:
        raise DataError(
            out_dir, f"holds a run already trained for {start} iterations, more than the "
            f"{config.iterations} asked for; pick a new --out or ask for at least {start}"
        )
    started = time.perf_counter()
    bar = tqdm(
        total=config.iterations, initial=start, desc=f"train {config.method}",
        disable=not progress, dynamic_ncols=True,
    )
    iteration = start
    stopped = _stale(iteration, state, config)
    while iteration < config.iterations and not stopped:
        loss = trainer.step(iteration)
        iteration += 1
        if iteration % config.validate_every == 0 or iteration == config.iterations:
            score = trainer.validation_score(val_episodes)
            if score > state.best_score:
                state = _Progress(best_score=score, best_iteration=iteration)
                _save_best(out_dir, trainer, run_config, iteration, state)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", best=f"{state.best_score:.3f}")
        stopped = _stale(iteration, state, config)
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations or stopped:
            # after the best weights: a checkpoint never runs ahead of config.json
            save_train_state(out_dir, trainer.module, trainer.optimizer, iteration)
    bar.close()
    seconds = time.perf_counter() - started
    best = load_run(out_dir, device)
    budget = _pick_budget(best, data, config, val_episodes)
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
        resumed_from=start,
    )


def _pick_budget(best: LoadedRun, data: SplitIndex, config: TrainConfig, val_episodes: list[Episode]) -> Budget:
    """The fine-tuning budget, picked on validation regions; none (0 steps) for R2-D2, which
    adapts through its head: its last layer is not what it meta-trained. Segmentation runs pick it on scene
    episodes, built as `adapt` builds its support (every class, labels spread over a scene's
    tiles), with a longer step grid, at the 5 labels per class a user typically gives: the budget
    is then the one a user's scene needs."""
    if config.method == "r2d2":
        return Budget(steps=0, lr=None, validation_accuracy=float("nan"))
    if config.task != "segmentation":
        return pick_budget(best.model, val_episodes, learned_rates=best.inner_lrs or None)
    scenes = data.episodes(
        "val", config.task, config.shape, config.validation_episodes, seed=config.seed + 1, protocol="scene"
    )
    return pick_budget(
        best.model, scenes, learned_rates=best.inner_lrs or None, shots=(SCENE_SHOTS,),
        step_grid=SCENE_FINETUNE_STEPS,
    )


def _stale(iteration: int, state: _Progress, config: TrainConfig) -> bool:
    """Early stopping: `patience` validations in a row without a better score."""
    return (iteration - state.best_iteration) // config.validate_every >= config.patience


def _saved_progress(out_dir: Path, run_config: RunConfig) -> _Progress | None:
    """The early-stopping state of an earlier run in `out_dir`, None when there is none.

    The earlier run must have the same settings (more iterations or another device may continue
    it), the same architecture and the same classes, bands and input statistics (same index).
    """
    if not (out_dir / CONFIG).exists():
        return None
    try:
        saved = load_config(out_dir)
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(
            out_dir, f"holds a config.json that is not a training run's ({error}); pick a new --out"
        ) from None
    differences = _differences(_identity(saved), _identity(run_config))
    if differences:
        raise DataError(
            out_dir, f"holds a run with other settings ({'; '.join(differences)}); pick a new "
            "--out, or remove the folder to start over"
        )
    best = -1.0 if saved.validation_accuracy is None else saved.validation_accuracy
    return _Progress(best_score=best, best_iteration=saved.iterations)


def _identity(run_config: RunConfig) -> dict:
    """What must match for a run to continue another, as plain JSON values."""
    identity = {
        **_comparable(run_config.settings),
        "arch": run_config.arch.to_dict(),
        "class_names": run_config.class_names,
        "bands": run_config.bands,
    }
    return json.loads(json.dumps(identity))


def _differences(saved: dict, wanted: dict) -> list[str]:
    """`key: there -> here` for every setting that differs."""
    differences = []
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) == wanted.get(key):
            continue
        if key in ("arch", "class_names", "bands"):
            differences.append(f"{key} differs (another index or model size)")
        else:
            differences.append(f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} now")
    return differences


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
        run_config, iterations=iteration, validation_accuracy=state.best_score, **trainer.run_fields()
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

    def run_fields(self) -> dict:
        """Learned settings stored in config.json beside the weights."""
        return {}

    def validation_score(self, episodes: list[Episode]) -> float:
        raise NotImplementedError


class _EpisodicTrainer(_Trainer):
    """Meta-training: each iteration is one outer step on a meta-batch of train episodes."""

    def __init__(self, data: SplitIndex, config: TrainConfig) -> None:
        self.config = config
        self.sampler = data.sampler("train", config.task, config.shape)
        self.regions = capable_regions(self.sampler, sorted(data.split("train")["region"].unique()))
        if not self.regions:
            raise DataError(data.path, "no train region can supply a meta-training episode")

    def meta_batch(self, iteration: int) -> list[Episode]:
        rng = np.random.default_rng([self.config.seed, iteration])
        chosen = rng.choice(self.regions, size=self.config.meta_batch)
        first = iteration * max(64, self.config.meta_batch)  # episode numbers never repeat
        return [
            self.sampler.sample(str(region), episode_rng(self.config.seed, str(region), first + slot))
            for slot, region in enumerate(chosen)
        ]


class _MamlTrainer(_EpisodicTrainer):
    """MAML/FOMAML: the outer step differentiates through the inner SGD loop."""

    def __init__(self, model: nn.Module, data: SplitIndex, config: TrainConfig) -> None:
        super().__init__(data, config)
        self.model = model
        self.learner = MetaLearner(
            model, steps=config.inner_steps, inner_lr=config.inner_lr,
            learn_inner_lr=config.learn_inner_lr, first_order=config.method == "fomaml",
            outer_lr=config.lr, rate_lr=config.rate_lr,
        )
        self.module, self.optimizer = self.learner, self.learner.optimizer

    def step(self, iteration: int) -> float:
        return self.learner.meta_train_step(self.meta_batch(iteration))

    def inner_rates(self) -> dict[str, float]:
        return {name: float(rate) for name, rate in self.learner.inner_lrs().items()}

    def validation_score(self, episodes: list[Episode]) -> float:
        return mean_accuracy(self.model, episodes, steps=self.config.inner_steps, lr=self.inner_rates())


class _RidgeTrainer(_EpisodicTrainer):
    """R2-D2: the outer step differentiates through a ridge head fitted on each support set."""

    def __init__(self, model: nn.Module, data: SplitIndex, config: TrainConfig) -> None:
        super().__init__(data, config)
        self.model = model
        self.learner = RidgeMetaLearner(model, outer_lr=config.lr)
        self.module, self.optimizer = self.learner, self.learner.optimizer

    def step(self, iteration: int) -> float:
        return self.learner.meta_train_step(self.meta_batch(iteration))

    def run_fields(self) -> dict:
        return {"head_penalty": self.learner.penalty(), "head_scale": float(self.learner.log_scale.detach().exp())}

    def validation_score(self, episodes: list[Episode]) -> float:
        head = HeadCandidate("r2d2 head", self.model, ridge_penalty=self.learner.penalty())
        return mean_candidate_accuracy(head, episodes)


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

    def validation_score(self, episodes: list[Episode]) -> float:
        return mean_accuracy(self.model, episodes, steps=self.config.inner_steps, lr=self.config.inner_lr)


_TRAINERS: dict[str, type[_Trainer]] = {
    "maml": _MamlTrainer, "fomaml": _MamlTrainer, "r2d2": _RidgeTrainer, "pretrain": _PretrainTrainer,
}

