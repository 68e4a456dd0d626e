"""The `train` step: train one of `models.learners.LEARNERS` (ProtoNet, Reptile, ANIL, Meta-SGD,
MAML++, MAML with gradient agreement, MAML, FOMAML, R2-D2, or pretraining on pooled regions) into
a run dir. Everything here is the same for every learner: batches, validation through the
learner's own test-time adaptation, checkpoints, early stopping and the budget pick.

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

from geo.atomic import check_output_folder
from geo.errors import DataError
from geo.progress import progress_bar
from models.backbones import arch_preset, build_model, last_layer_names
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
from models.learner import FINETUNE_ADAPTATIONS, Learner, LearnerSettings
from models.learners import LEARNERS
from pipeline.candidates import run_candidates
from pipeline.protocol import (
    SCENE_FINETUNE_STEPS,
    SCENE_SHOTS,
    Budget,
    EpisodeShape,
    SplitIndex,
    Task,
    load_split_index,
    mean_candidate_accuracy,
    pick_budget,
)
from tasks.crops import Crop, CroppedSampler, random_windows
from tasks.episodes import Episode, capable_regions, episode_rng

METHODS: tuple[str, ...] = tuple(LEARNERS)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; every field is recorded in the run's config.json."""

    method: str = "maml"
    """One of `METHODS`."""
    task: Task = "segmentation"
    iterations: int = 300
    seed: int = 0
    device: str = "auto"
    size: Literal["tiny", "base"] = "tiny"
    shape: EpisodeShape = field(default_factory=EpisodeShape)
    meta_batch: int = 4
    inner_steps: int = 3
    inner_lr: float = LearnerSettings.inner_lr
    """Initial inner SGD rate (see `models.learner.LearnerSettings`)."""
    learn_inner_lr: bool = True
    lr: float = LearnerSettings.outer_lr
    """Outer Adam rate (meta-learners) or Adam rate (pretrain, ProtoNet, R2-D2)."""
    rate_lr: float = LearnerSettings.rate_lr
    """Outer Adam rate of the learned log inner rates: at `lr` they move ~0.1% a step and stay
    at their initial value through a demo-length run."""
    reptile_step: float = LearnerSettings.reptile_step
    reptile_inner_lr: float = LearnerSettings.reptile_inner_lr
    second_order_from: float = LearnerSettings.second_order_from
    """MAML++: the fraction of the run trained first-order."""
    batch_size: int = 16
    """Tiles per pretraining batch."""
    validate_every: int = 25
    validation_episodes: int = 8
    patience: int = 4
    """Validations without improvement before stopping early."""
    checkpoint_every: int = 25
    init_from: str | None = None
    """A run directory whose weights start training (e.g. MAML from a pretrained model)."""
    crop: int | None = 96
    """Segmentation: side in px of the windows meta-training episodes, pretraining batches and
    the validation episodes of this run (early stopping, the budget pick) are cut into
    (`tasks.crops`): one window per query tile, dense support tile and pretraining tile, chosen to
    hold labelled pixels of the episode's classes; None trains on whole tiles. A tile no larger
    than `crop` stays whole. Classification episodes are always whole patches; `landcover
    evaluate` scores whole tiles and `adapt` cuts its own windows. A multiple of the U-Net's
    stride (8 tiny, 32 base)."""
    support_window: int = 32
    """With `crop`: side in px of the windows cut around the labelled pixels of a sparse support,
    on a grid as `adapt` cuts its support (the default of adapt's `support_window`); every
    labelled pixel is kept. A multiple of the U-Net's stride."""

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
            "iterations": 1,
            "validate_every": 1,
            "validation_episodes": 1,
            "patience": 1,
            "checkpoint_every": 1,
            "meta_batch": 1,
            "batch_size": 1,
            "inner_steps": 0,
        }
        for name, least in at_least.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        for name in ("inner_lr", "lr", "rate_lr", "reptile_step", "reptile_inner_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.second_order_from <= 1:
            raise ValueError(f"second_order_from must be within 0..1, got {self.second_order_from}")
        if self.shape.k_shot < 1 or (self.task == "classification" and self.shape.q_queries < 1):
            raise ValueError("shape: training episodes need at least 1 shot (and, for classification, 1 query)")
        stride = 2 ** arch_preset(self.size, "segmentation", 1, 1).encoder_depth
        for name in ("crop", "support_window"):
            side = getattr(self, name)
            if side is not None and (side < stride or side % stride):
                raise ValueError(
                    f"{name} must be a multiple of {stride} px (the {self.size} U-Net halves its input "
                    f"{stride.bit_length() - 1} times), got {side}"
                )

    def crop_shape(self) -> Crop | None:
        """How episodes and pretraining batches are cut; None: whole tiles (and classification)."""
        if self.crop is None or self.task != "segmentation":
            return None
        return Crop(size=self.crop, support_window=self.support_window)

    def settings(self) -> dict:
        return dataclasses.asdict(self)

    def learner_settings(self) -> LearnerSettings:
        return LearnerSettings(
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            learn_inner_lr=self.learn_inner_lr,
            outer_lr=self.lr,
            rate_lr=self.rate_lr,
            iterations=self.iterations,
            reptile_step=self.reptile_step,
            reptile_inner_lr=self.reptile_inner_lr,
            second_order_from=self.second_order_from,
        )


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
    adaptation: str = "finetune"
    """How the learner adapts at test time (`models.learner.Adaptation`)."""
    resumed_from: int = 0
    """The iteration an interrupted run in the same directory had reached (0: a fresh start)."""


@dataclass
class _Progress:
    """Early-stopping state, kept in config.json so a resumed run continues it."""

    best_score: float = -1.0
    best_iteration: int = 0


def train(
    index_path: Path,
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
    root: Path | None = None,
) -> TrainSummary:
    """Train `config.method` on the train split of the index; write weights and config.json.
    `root`: the dataset's folder when it is no longer where the index says.

    A directory that already holds a run with the same settings continues it (from its last
    checkpoint) and ends with the weights an uninterrupted run would have; one with other
    settings is refused before anything is written.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, "--out")
    data = load_split_index(index_path, root)
    mean, std = data.band_statistics("train")
    arch = dataclasses.replace(
        arch_preset(config.size, config.task, len(data.bands), len(data.class_names)),
        input_mean=mean,
        input_std=std,
    )
    run_config = RunConfig(
        method=config.method,
        task=config.task,
        arch=arch,
        class_names=data.class_names,
        class_colors=data.class_colors,
        bands=data.bands,
        normalisation={"clip": [0, 10000], "divide": 10000, "uint8_divide": 255},
        seed=config.seed,
        settings=config.settings(),
    )
    saved = _saved_progress(out_dir, run_config)  # refuse a foreign run before any work
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(arch, seed=config.seed).to(device)
    if config.init_from is not None:
        model.load_state_dict(_initial_weights(Path(config.init_from), arch))
    val_episodes = validation_episodes(data, config, progress=progress)
    trainer = _Trainer(LEARNERS[config.method](model, config.learner_settings()), data, config)
    run_config = dataclasses.replace(run_config, **trainer.learner.run_fields())
    if saved is None:
        # claim the directory at once: a kill before the first validation still leaves the
        # settings that a restart is checked against
        save_run(out_dir, trainer.model, run_config, trainer.learner.inner_rates())
        saved = _Progress()
    state = saved
    start = load_train_state(out_dir, trainer.module, trainer.optimizer)
    if start > config.iterations:
        raise DataError(
            out_dir,
            f"holds a run already trained for {start} iterations, more than the "
            f"{config.iterations} asked for; pick a new --out or ask for at least {start}",
        )
    started = time.perf_counter()
    iteration = start
    stopped = _stale(iteration, state, config)
    # the bar ends its line even when a step fails (e.g. a full disk), before the error's line
    with progress_bar(
        config.iterations, f"train {config.method}", unit="iterations", initial=start, enabled=progress
    ) as bar:
        while iteration < config.iterations and not stopped:
            loss = trainer.step(iteration)
            iteration += 1
            if iteration % config.validate_every == 0 or iteration == config.iterations:
                bar.set_postfix_str(f"loss={loss:.3f}, validating on {len(val_episodes)} episodes")
                score = trainer.validation_score(val_episodes, run_config)
                if score > state.best_score:
                    state = _Progress(best_score=score, best_iteration=iteration)
                    _save_best(out_dir, trainer, run_config, iteration, state)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", best=f"{state.best_score:.3f}")
            stopped = _stale(iteration, state, config)
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations or stopped:
                # after the best weights: a checkpoint never runs ahead of config.json
                save_train_state(out_dir, trainer.module, trainer.optimizer, iteration)
    seconds = time.perf_counter() - started
    best = load_run(out_dir, device)
    budget = _pick_budget(best, data, config, val_episodes, progress=progress)
    done = iteration - start
    per_iteration = seconds / done if done else load_config(out_dir).seconds_per_iteration
    final = dataclasses.replace(
        load_config(out_dir),
        finetune_steps=budget.steps,
        finetune_lr=budget.lr,
        seconds_per_iteration=per_iteration,
    )
    save_run(out_dir, best.model, final, best.inner_lrs)
    return TrainSummary(
        run_dir=out_dir,
        method=config.method,
        iterations=iteration,
        best_iteration=state.best_iteration,
        validation_accuracy=state.best_score,
        finetune_steps=budget.steps,
        finetune_lr=budget.lr,
        seconds=seconds,
        iterations_per_second=done / seconds if seconds > 0 and done else 0.0,
        adaptation=LEARNERS[config.method].adaptation,
        resumed_from=start,
    )


def validation_episodes(data: SplitIndex, config: TrainConfig, *, progress: bool = False) -> list[Episode]:
    """The episodes early stopping scores a run on: of the val split, cut as its training
    episodes are (`TrainConfig.crop`)."""
    return data.episodes(
        "val",
        config.task,
        config.shape,
        config.validation_episodes,
        seed=config.seed + 1,
        progress=progress,
        crop=config.crop_shape(),
    )


def _pick_budget(
    best: LoadedRun, data: SplitIndex, config: TrainConfig, val_episodes: list[Episode], *, progress: bool
) -> Budget:
    """The fine-tuning budget, picked on validation regions; none (0 steps) for learners that
    adapt without fine-tuning (prototypes, a ridge head). Segmentation runs pick it on scene
    episodes, built as `adapt` builds its support (every class, labels spread over a scene's
    tiles), with a longer step grid, at the 5 labels per class a user typically gives: the budget
    is then the one a user's scene needs. With `crop`, they are cut as training episodes are: the
    support into windows around its labels, as adapt cuts its own."""
    learner = LEARNERS[config.method]
    if learner.adaptation not in FINETUNE_ADAPTATIONS:
        return Budget(steps=0, lr=None, validation_accuracy=float("nan"))
    rates = learner.test_rates(best.inner_lrs)
    only = last_layer_names(best.model) if learner.adaptation == "finetune-head" else None
    desc = f"pick budget {config.method}"
    if config.task != "segmentation":
        return pick_budget(best.model, val_episodes, learned_rates=rates, only=only, progress=progress, desc=desc)
    scenes = data.episodes(
        "val",
        config.task,
        config.shape,
        config.validation_episodes,
        seed=config.seed + 1,
        protocol="scene",
        progress=progress,
        crop=config.crop_shape(),
    )
    return pick_budget(
        best.model,
        scenes,
        learned_rates=rates,
        shots=(SCENE_SHOTS,),
        step_grid=SCENE_FINETUNE_STEPS,
        only=only,
        progress=progress,
        desc=desc,
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
            out_dir,
            f"holds a run with other settings ({'; '.join(differences)}); pick a new "
            "--out, or remove the folder to start over",
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


def _save_best(out_dir: Path, trainer: _Trainer, run_config: RunConfig, iteration: int, state: _Progress) -> None:
    config = dataclasses.replace(
        run_config, iterations=iteration, validation_accuracy=state.best_score, **trainer.learner.run_fields()
    )
    save_run(out_dir, trainer.model, config, trainer.learner.inner_rates())


class _Trainer:
    """A learner fed with training batches and scored on validation episodes."""

    def __init__(self, learner: Learner, data: SplitIndex, config: TrainConfig) -> None:
        self.learner, self.data, self.config = learner, data, config
        self.model, self.module, self.optimizer = learner.model, learner, learner.optimizer
        self.crop = config.crop_shape()
        if learner.episodic:
            self.sampler = data.sampler("train", config.task, config.shape)
            if self.crop is not None:  # cut from each episode's own generator: still a function of its number
                self.sampler = CroppedSampler(self.sampler, self.crop)
            self.regions = capable_regions(self.sampler, sorted(data.split("train")["region"].unique()))
            if not self.regions:
                raise DataError(data.path, "no train region can supply a meta-training episode")
            return
        rows = data.split("train")
        if config.task == "classification":
            rows = rows[rows["majority_class"] >= 0]
        if rows.empty:
            raise DataError(data.path, "the train split has no labelled tiles")
        self.positions = rows.index.to_numpy()
        self.majority = rows["majority_class"].to_numpy()

    def step(self, iteration: int) -> float:
        batch = self.meta_batch(iteration) if self.learner.episodic else self.tiles(iteration)
        return self.learner.step(batch, iteration)

    def meta_batch(self, iteration: int) -> list[Episode]:
        rng = np.random.default_rng([self.config.seed, iteration])
        chosen = rng.choice(self.regions, size=self.config.meta_batch)
        first = iteration * max(64, self.config.meta_batch)  # episode numbers never repeat
        return [
            self.sampler.sample(str(region), episode_rng(self.config.seed, str(region), first + slot))
            for slot, region in enumerate(chosen)
        ]

    def tiles(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        """A pretraining batch: tiles pooled from every train region, on global class ids; with
        `crop`, a window of each holding labelled pixels of as many classes as a few tries find."""
        rng = np.random.default_rng([self.config.seed, iteration])
        picked = rng.choice(len(self.positions), size=self.config.batch_size)
        positions = self.positions[picked]
        images = self.data.tiles.images(positions)
        if self.config.task == "classification":
            return images, self.majority[picked]
        labels = self.data.tiles.masks(positions).astype(np.int64)
        if self.crop is None:
            return images, labels
        return random_windows(images, labels, self.crop.size, rng, candidates=self.crop.candidates)

    def validation_score(self, episodes: list[Episode], run_config: RunConfig) -> float:
        """Mean accuracy of the learner's own test-time adaptation, fine-tuning for its
        meta-training step count at its own (or the configured) rate."""
        fields = self.learner.run_fields()
        rates = self.learner.inner_rates()
        config = dataclasses.replace(
            run_config,
            **fields,
            finetune_steps=fields.get("inner_steps", self.config.inner_steps),
            finetune_lr=None if rates else fields.get("inner_lr", self.config.inner_lr),
        )
        own = run_candidates(LoadedRun(self.model, config, dict(rates)), self.config.method)[0]
        return mean_candidate_accuracy(own, episodes)
