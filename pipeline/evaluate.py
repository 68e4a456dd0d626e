"""The `evaluate` step: every candidate on the same held-out episodes and shot counts; a report
with a table and a plot.

Each run is scored by its learner's own adaptation (fine-tuned at the budget picked on validation
regions, or its prototypes, or its ridge head) and with a closed-form head on its features
(`pipeline.candidates`). Every row carries its cost: the run's seconds per training iteration,
and the seconds to adapt to one episode, measured here. Two references need no run directory
and are always in the report: random init (the first run's architecture with fresh weights, its
budget picked on validation like the others') and the classical per-pixel logistic regression
(`pixel`), so every report shows whether the networks beat it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geo.atomic import check_output_folder
from geo.errors import DataError
from geo.progress import progress_bar
from models.backbones import build_model
from models.checkpoint import LoadedRun, load_run
from models.device import pick_device
from models.metrics import mean_ci
from pipeline.candidates import PIXEL, Candidate, FinetuneCandidate, PixelCandidate, run_candidates
from pipeline.protocol import (
    FINETUNE_STEPS,
    SCENE_FINETUNE_STEPS,
    SCENE_SHOTS,
    Budget,
    EpisodeShape,
    Protocol,
    is_task,
    load_split_index,
    pick_budget,
    score_candidate,
)
from pipeline.report import METRICS, ReportFiles, write_report
from tasks.episodes import fewer_shots

RANDOM_INIT = "random init"


@dataclass(frozen=True)
class EvaluateConfig:
    shots: tuple[int, ...] = (0, 1, 2, 5, 10)
    episodes: int = 50
    validation_episodes: int = 8
    seed: int = 0
    device: str = "auto"
    n_way: int = 4
    q_queries: int = 10
    query_tiles: int = 2
    protocol: Protocol | None = None
    """Segmentation episodes: "scene" (built as `adapt` builds its support: every class of a scene,
    labels spread over its tiles, queries every other labelled pixel) or "episode" (N-way, labels
    in a few tiles). None: "scene" for segmentation. Classification is always "episode"."""

    def __post_init__(self) -> None:
        """Shot counts sorted and unique (one report row each); impossible settings rejected."""
        if self.protocol not in (None, "episode", "scene"):
            raise ValueError(f"protocol: {self.protocol!r} is not one of episode, scene")
        shots = tuple(sorted({int(k) for k in self.shots}))
        if not shots or shots[0] < 0:
            raise ValueError(f"shots must be one or more counts >= 0, got {list(self.shots)}")
        object.__setattr__(self, "shots", shots)
        for name in ("episodes", "validation_episodes", "n_way", "q_queries", "query_tiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EvaluationReport:
    files: ReportFiles
    results: pd.DataFrame
    budgets: dict[str, Budget]


def evaluate(
    index_path: Path,
    run_dirs: Sequence[Path],
    out_dir: Path,
    config: EvaluateConfig = EvaluateConfig(),
    *,
    progress: bool = True,
    root: Path | None = None,
) -> EvaluationReport:
    """Score each run and random init on the test split; write results.csv, report.md, the plot.
    `root`: the dataset's folder when it is no longer where the index says."""
    if not run_dirs:
        raise DataError(index_path, "evaluate needs at least one run directory (--runs)")
    check_output_folder(out_dir, "--out")
    device = pick_device(config.device)
    runs = [load_run(Path(run_dir), device) for run_dir in run_dirs]
    first = runs[0].config
    for run_dir, run in zip(run_dirs, runs):
        if run.config.task != first.task or run.config.class_names != first.class_names:
            raise DataError(
                run_dir,
                f"is a {run.config.task} run over other classes than {run_dirs[0]} "
                f"({first.task}); compare runs of one task and class scheme",
            )
    task = first.task
    if not is_task(task):
        raise DataError(run_dirs[0], f"is a run of task {task!r}; evaluate scores classification and segmentation runs")
    for run_dir, run in zip(run_dirs, runs):
        if run.config.finetune_steps is None:
            raise DataError(run_dir, "has no fine-tuning budget: its training did not finish (run it again)")
    methods: list[Candidate] = [
        candidate
        for name, run_dir, run in zip(_names(run_dirs, runs), run_dirs, runs)
        for candidate in run_candidates(run, name, source=str(run_dir))
    ]
    data = load_split_index(index_path, root)
    for run_dir, run in zip(run_dirs, runs):
        if tuple(run.config.class_names) != data.class_names:
            raise DataError(run_dir, f"was trained on other classes than the index {index_path}")
        if tuple(run.config.bands) != data.bands:
            raise DataError(run_dir, f"was trained on other bands than the index {index_path} has")
    # segmentation samplers label at least one pixel per class, even for a 0-shot-only report
    least = 1 if task == "segmentation" else 0
    shape = EpisodeShape(
        n_way=config.n_way,
        k_shot=max(max(config.shots), least),
        q_queries=config.q_queries,
        query_tiles=config.query_tiles,
    )
    protocol = config.protocol or ("scene" if task == "segmentation" else "episode")
    budget_shape = EpisodeShape(config.n_way, 5, config.q_queries, config.query_tiles)
    validation = data.episodes(
        "val", task, budget_shape, config.validation_episodes, config.seed + 1, protocol=protocol, progress=progress
    )
    test = data.episodes("test", task, shape, config.episodes, seed=config.seed, protocol=protocol, progress=progress)

    random_model = build_model(first.arch, seed=config.seed).to(device)
    grid = SCENE_FINETUNE_STEPS if protocol == "scene" else FINETUNE_STEPS
    random_budget = pick_budget(
        random_model,
        validation,
        step_grid=grid,
        shots=(SCENE_SHOTS,) if protocol == "scene" else (1, 5),
        progress=progress,
        desc=f"pick budget {RANDOM_INIT}",
    )
    assert random_budget.lr is not None  # given no learned rates, pick_budget picks one of its fixed rates
    methods.append(FinetuneCandidate(RANDOM_INIT, random_model, random_budget.steps, random_budget.lr))
    methods.append(PixelCandidate())
    budgets = {
        m.name: Budget(m.steps, m.lr if isinstance(m.lr, float) else None, float("nan"))
        for m in methods
        if isinstance(m, FinetuneCandidate)
    }
    per_iteration = {
        candidate.name: run.config.seconds_per_iteration
        for name, run_dir, run in zip(_names(run_dirs, runs), run_dirs, runs)
        for candidate in run_candidates(run, name, source=str(run_dir))
    }
    budgets[RANDOM_INIT] = random_budget

    rows = []
    total = len(methods) * len(config.shots) * len(test)
    with progress_bar(total, "evaluate", unit="episodes", enabled=progress) as bar:
        for method in methods:
            for shots in config.shots:
                bar.set_postfix_str(f"{method.name}, {shots}-shot", refresh=False)
                per_episode: list[dict[str, float]] = []
                seconds: list[float] = []
                for number, episode in enumerate(test):
                    cut = fewer_shots(episode, shots, seed=number)
                    per_episode.append(score_candidate(method, cut, seconds))
                    bar.update(1)
                row = _summarise(method.name, shots, per_episode, segmentation=task == "segmentation")
                rows.append(
                    {
                        **row,
                        "adapt_seconds": float(np.mean(seconds)),
                        "train_seconds_per_iteration": per_iteration.get(method.name) or float("nan"),
                    }
                )
    results = pd.DataFrame(rows)
    notes = _notes(methods, task, config, len(test), protocol)
    files = write_report(results, Path(out_dir), title=f"Few-shot {task} on {Path(index_path).name}", notes=notes)
    return EvaluationReport(files=files, results=results, budgets=budgets)


def margins(results: pd.DataFrame) -> pd.DataFrame:
    """Per shot count: the best trained candidate, its accuracy, the classical baseline's, and the
    margin between them (positive: the learner beats the classical baseline)."""
    rows = []
    for _, group in results.groupby("shots"):
        trained = group[~group["method"].isin([PIXEL, RANDOM_INIT])]
        best = trained.loc[trained["accuracy"].idxmax()]
        classical = float(group.loc[group["method"] == PIXEL, "accuracy"].item())
        rows.append(
            {
                "shots": int(group["shots"].iloc[0]),
                "best": best["method"],
                "accuracy": float(best["accuracy"]),
                "classical": classical,
                "margin": float(best["accuracy"]) - classical,
            }
        )
    return pd.DataFrame(rows)


def _names(run_dirs: Sequence[Path], runs: Sequence[LoadedRun]) -> list[str]:
    """Unique method names for the report: the run folder's name (or path) is added when a method
    repeats."""
    methods = [run.config.method for run in runs]
    names = [
        method if methods.count(method) == 1 else f"{method} ({Path(run_dir).name})"
        for method, run_dir in zip(methods, run_dirs)
    ]
    return [
        name if names.count(name) == 1 else f"{method} ({run_dir})"
        for name, method, run_dir in zip(names, methods, run_dirs)
    ]


def _summarise(method: str, shots: int, per_episode: list[dict[str, float]], *, segmentation: bool) -> dict:
    row: dict = {"method": method, "shots": shots, "episodes": len(per_episode)}
    for metric in METRICS:
        key = "macro_f1" if metric == "f1" else metric
        if metric == "miou" and not segmentation:
            row[metric] = row[f"{metric}_low"] = row[f"{metric}_high"] = float("nan")
            continue
        mean, low, high = mean_ci([scores[key] for scores in per_episode])
        row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = mean, low, high
    return row


def _notes(methods: Sequence[Candidate], task: str, config: EvaluateConfig, episodes: int, protocol: str) -> str:
    how = "; ".join(f"{m.name}: " + ", ".join(f"{key} {value}" for key, value in m.describe().items()) for m in methods)
    unit = "labelled pixels per class" if task == "segmentation" else "labelled tiles per class"
    return (
        f"{episodes} test episodes (seed {config.seed}, {protocol} protocol), shots = {unit}; every method is scored "
        f"on the same episodes. Fine-tuning budgets were picked on validation regions; heads and the "
        f"pixel classifier need none (with 0 shots they know no class: chance). {how}."
    )
