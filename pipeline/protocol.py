"""The evaluation protocol, identical for every method: which episodes, how a model is scored on
one, and how its test-time fine-tuning budget is picked (on validation regions, never on test).

Training uses the same pieces for early stopping, so "better on validation" means the same thing
when training and when choosing the budget.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeGuard, get_args

import numpy as np
import pandas as pd
from torch import nn

from geo.errors import DataError
from geo.index import read_index
from geo.progress import progress_bar
from geo.sources import index_source
from geo.sources.base import Source
from models.finetune import finetune, predict
from models.maml import Schedule
from models.metrics import episode_scores
from pipeline.candidates import Candidate, Support
from tasks.crops import Crop, CroppedSampler
from tasks.episodes import (
    ClassificationSampler,
    DenseSegmentationSampler,
    Episode,
    Sampler,
    SceneSampler,
    SegmentationSampler,
    TileCache,
    fewer_shots,
    sample_episodes,
)

Task = Literal["classification", "segmentation"]
Protocol = Literal["episode", "scene"]


def is_task(value: str) -> TypeGuard[Task]:
    """Whether a task name (as a run's config.json records it) is one of `Task`."""
    return value in get_args(Task)


FINETUNE_STEPS = (3, 10, 25)
FINETUNE_LRS = (0.01, 0.03, 0.1, 0.3)
"""The grid of fine-tuning budgets tried on validation regions for every method."""
SCENE_FINETUNE_STEPS = (3, 10, 25, 50)
SCENE_SHOTS = 5
"""Labels per class of the scene episodes a segmentation budget is picked on."""
"""The longer step grid of scene episodes: a scene's support (every class, labels spread over many
windows) takes more steps to fit than a 4-way episode's few tiles."""


@dataclass(frozen=True)
class EpisodeShape:
    """What an episode holds; segmentation shots are labelled pixels per class."""

    n_way: int = 4
    k_shot: int = 5
    q_queries: int = 10
    query_tiles: int = 2

    def __post_init__(self) -> None:
        if self.n_way < 1 or self.query_tiles < 1 or min(self.k_shot, self.q_queries) < 0:
            raise ValueError(
                f"bad episode shape: {self.n_way}-way {self.k_shot}-shot, {self.q_queries} queries, "
                f"{self.query_tiles} query tiles (n_way and query_tiles >= 1, shots and queries >= 0)"
            )


@dataclass
class SplitIndex:
    """An index with regions and splits, and the class scheme and bands from its metadata."""

    path: Path
    frame: pd.DataFrame
    metadata: dict
    tiles: TileCache

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.metadata["scheme"]["names"])

    @property
    def class_colors(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(tuple(color) for color in self.metadata["scheme"]["colors"])

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.metadata["bands"])

    @property
    def source(self) -> Source:
        return self.tiles.source

    def band_statistics(self, split: str = "train") -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-band mean and standard deviation of a split's pixels, from the index's per-tile
        statistics (law of total variance), so no pixel is read again."""
        names = list(self.metadata["feature_names"])
        if self.split(split).empty:
            raise DataError(self.path, f"the {split} split has no tiles")
        features = np.stack([np.asarray(f, dtype=np.float64) for f in self.split(split)["features"]])
        means = features[:, [names.index(f"{band}_mean") for band in self.bands]]
        stds = features[:, [names.index(f"{band}_std") for band in self.bands]]
        variance = (stds**2).mean(axis=0) + means.var(axis=0)
        return tuple(means.mean(axis=0).tolist()), tuple(np.sqrt(variance).tolist())

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split, keeping their positions in the whole index (for the cache)."""
        return self.frame[self.frame["split"] == name]

    def sampler(self, split: str, task: Task, shape: EpisodeShape, protocol: Protocol = "episode") -> Sampler:
        """The episode sampler of `task` over one split's regions; "scene" segmentation episodes
        are built the way `adapt` builds its support set."""
        rows = self.split(split)
        if task == "segmentation" and protocol == "scene":
            return SceneSampler(rows, self.tiles, k_shot=shape.k_shot, class_names=self.class_names)
        if task == "classification":
            return ClassificationSampler(
                rows,
                self.tiles,
                n_way=shape.n_way,
                k_shot=shape.k_shot,
                q_queries=shape.q_queries,
                class_names=self.class_names,
            )
        if self.source.dense_episodes:
            return DenseSegmentationSampler(
                rows,
                self.tiles,
                k_shot=shape.k_shot,
                query_tiles=shape.query_tiles,
                class_names=self.class_names,
            )
        return SegmentationSampler(
            rows,
            self.tiles,
            n_way=shape.n_way,
            k_shot=shape.k_shot,
            query_tiles=shape.query_tiles,
            class_names=self.class_names,
        )

    def episodes(
        self,
        split: str,
        task: Task,
        shape: EpisodeShape,
        count: int,
        seed: int,
        protocol: Protocol = "episode",
        *,
        progress: bool = False,
        crop: Crop | None = None,
    ) -> list[Episode]:
        """`count` seeded episodes of one split (the same list for every method); `progress`
        shows a bar (reading tiles for them can take minutes on large images); `crop` cuts every
        episode into windows (`tasks.crops`), as meta-training cuts its own."""
        sampler = self.sampler(split, task, shape, protocol)
        if crop is not None:
            sampler = CroppedSampler(sampler, crop)
        regions = sorted(self.split(split)["region"].unique())
        try:
            with progress_bar(count, f"sample {split} episodes", unit="episodes", enabled=progress) as bar:
                episodes = []
                for episode in sample_episodes(sampler, regions, count, seed=seed):
                    episodes.append(episode)
                    bar.update()
                return episodes
        except ValueError as error:
            raise DataError(self.path, f"{split} split: {error}") from None


def load_split_index(path: Path, root: Path | None = None) -> SplitIndex:
    """Read an index that `landcover regions` has given regions and splits; `root`: the dataset's
    folder when it is no longer where the index says (see `geo.index.read_index`)."""
    frame, metadata = read_index(path, root)
    if "split" not in frame.columns or "region" not in frame.columns:
        raise DataError(path, "the index has no regions/splits yet: run `landcover regions` first")
    if metadata.get("root") and not Path(metadata["root"]).is_dir():
        raise DataError(
            path, f"its dataset folder {metadata['root']} is not there (moved?): give its new place with --root"
        )
    frame = frame.reset_index(drop=True)
    return SplitIndex(path=Path(path), frame=frame, metadata=metadata, tiles=TileCache(frame, index_source(metadata)))


def score_episode(model: nn.Module, episode: Episode, *, steps: int, lr: Schedule, seed: int = 0) -> dict[str, float]:
    """Fine-tune on the support set, predict the query set, score it."""
    return score_queries(_tune(model, episode, steps, lr, seed), episode)


def _tune(
    model: nn.Module,
    episode: Episode,
    steps: int,
    lr: Schedule,
    seed: int,
    *,
    only: Collection[str] | None = None,
    first_step: int = 0,
) -> nn.Module:
    return finetune(
        model,
        episode.support_images,
        episode.support_labels,
        episode.classes,
        steps=steps,
        lr=lr,
        seed=seed,
        only=only,
        first_step=first_step,
    )


def score_queries(model: nn.Module, episode: Episode) -> dict[str, float]:
    """Scores of an (already fine-tuned) model on an episode's query set."""
    predicted = predict(model, episode.query_images, episode.classes).argmax(axis=1)
    return episode_scores(
        episode.query_labels,
        predicted,
        len(episode.classes),
        segmentation=episode.query_labels.ndim > 1,
    )


def episode_support(episode: Episode) -> Support:
    """An episode's support set as a candidate fits on it."""
    return Support(episode.support_images, episode.support_labels, episode.classes)


def score_candidate(candidate: Candidate, episode: Episode, fit_seconds: list[float] | None = None) -> dict[str, float]:
    """Fit a candidate on the support set, predict the query set, score it; the fit's wall time
    is appended to `fit_seconds` when given."""
    started = time.perf_counter()
    predictor = candidate.fit(episode_support(episode))
    if fit_seconds is not None:
        fit_seconds.append(time.perf_counter() - started)
    predicted = predictor(episode.query_images).argmax(axis=1)
    return episode_scores(
        episode.query_labels,
        predicted,
        len(episode.classes),
        segmentation=episode.query_labels.ndim > 1,
    )


def mean_candidate_accuracy(candidate: Candidate, episodes: Sequence[Episode]) -> float:
    """Mean query accuracy of a candidate over episodes: the validation score of a head."""
    return float(np.mean([score_candidate(candidate, episode)["accuracy"] for episode in episodes]))


def mean_accuracy(model: nn.Module, episodes: Sequence[Episode], *, steps: int, lr: Schedule) -> float:
    """Mean query accuracy over episodes after fine-tuning: the validation score."""
    return float(
        np.mean(
            [
                score_episode(model, episode, steps=steps, lr=lr, seed=number)["accuracy"]
                for number, episode in enumerate(episodes)
            ]
        )
    )


@dataclass(frozen=True)
class Budget:
    """A test-time fine-tuning budget; `lr` None means the run's learned per-tensor rates."""

    steps: int
    lr: float | None
    validation_accuracy: float


def pick_budget(
    model: nn.Module,
    episodes: Sequence[Episode],
    *,
    learned_rates: Schedule | None = None,
    shots: Sequence[int] = (1, 5),
    step_grid: Sequence[int] = FINETUNE_STEPS,
    only: Collection[str] | None = None,
    progress: bool = False,
    desc: str = "pick budget",
) -> Budget:
    """The (steps, rate) of best mean validation accuracy over `shots`, from the shared grid.

    A model with learned inner rates (MAML and its relatives) also tries its own rates at each
    step count; `only` fine-tunes those parameters alone (ANIL). `progress` shows a bar `desc`
    over every fine-tuning step of the grid, saying which rate and episode it is scoring.
    """
    # (the rate reported, the rate fine-tuned at): None reports the learned rates
    rates: list[tuple[float | None, Schedule]] = [(lr, lr) for lr in FINETUNE_LRS]
    if learned_rates:
        rates.append((None, learned_rates))
    cut = [(number, k, fewer_shots(episode, k, seed=number)) for k in shots for number, episode in enumerate(episodes)]
    best: Budget | None = None
    bar = progress_bar(len(rates) * len(cut) * max(step_grid, default=0), desc, unit="steps", enabled=progress)
    with bar:
        for lr, rate in rates:
            totals = np.zeros(len(step_grid))
            for number, k, episode in cut:
                named = "learned rates" if lr is None else f"lr {lr:g}"
                bar.set_postfix_str(f"{named}, {k}-shot episode {number + 1}/{len(episodes)}", refresh=False)
                # full-batch SGD has no state, so the step counts of the grid are one run's checkpoints
                tuned, done = model, 0
                for position, steps in enumerate(step_grid):
                    tuned = _tune(tuned, episode, steps - done, rate, number, only=only, first_step=done)
                    totals[position] += score_queries(tuned, episode)["accuracy"]
                    bar.update(steps - done)
                    done = steps
            for position, steps in enumerate(step_grid):
                accuracy = float(totals[position] / len(cut))
                if best is None or accuracy > best.validation_accuracy + 1e-9:
                    best = Budget(steps=steps, lr=lr, validation_accuracy=accuracy)
    assert best is not None
    return best
