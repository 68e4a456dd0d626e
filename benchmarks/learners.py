"""Every learner against the classical baselines, on one protocol, with its cost.

    python -m benchmarks.learners --work /tmp/learners-bench --difficulty hard

For each task, on the generator's data of the given difficulty: classification on EuroSAT-layout
patches (3 UTM zones: train, validation and test regions, 4-way episodes, as the issue's real
EuroSAT trial), segmentation on the demo's SEN12MS-layout tiles (scene episodes, as `adapt`
faces). Pretrains once, trains every other learner from the pretrained weights (as the README
does), and evaluates all of them, random init and the classical logistic regression (`pixel`: on
each pixel's bands, or on each tile's per-band mean and std for classification) on the same test
episodes at 1 and 5 shots. Prints each table (with the cost columns) and the margin of the best
learner over the classical baseline. Races between methods live here, never in the test suite.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from geo.sample_data import write_eurosat, write_sen12ms
from models.checkpoint import load_config
from models.learners import LEARNERS
from pipeline.evaluate import EvaluateConfig, evaluate, margins
from pipeline.ingest import ingest
from pipeline.protocol import EpisodeShape, Task
from pipeline.regions import build_regions
from pipeline.train import TrainConfig, train

SHOTS = (1, 5)
PRETRAIN_ITERATIONS = 300
ITERATIONS = 100
"""Training length of every learner after pretraining (all start from the pretrained weights)."""
SHAPES: dict[Task, EpisodeShape] = {
    "classification": EpisodeShape(n_way=4, k_shot=5, q_queries=5),
    "segmentation": EpisodeShape(n_way=4, k_shot=10, query_tiles=2),
}


def dataset(work: Path, task: Task, difficulty: str) -> Path:
    """The task's generated data, ingested and split into regions (reused when present)."""
    index = work / f"{task}-{difficulty}.parquet"
    if index.exists():
        return index
    if task == "classification":
        root = write_eurosat(
            work / f"eurosat-{difficulty}", seed=0, regions=3, size=64, patches_per_class=45, difficulty=difficulty
        )
        ingest("folder", root, index, progress=False)
        build_regions(index, index, by="metadata", split=(0.34, 0.33, 0.33), seed=0)
    else:
        root = write_sen12ms(work / f"sen12ms-{difficulty}", seed=0, regions=8, difficulty=difficulty)
        ingest("sen12ms", root, index, progress=False)
        build_regions(index, index, by="metadata", split=(0.6, 0.2, 0.2), seed=0)
    return index


def train_all(work: Path, index: Path, task: Task, difficulty: str, learners: list[str]) -> list[Path]:
    """Pretrain, then every learner from the pretrained weights (finished runs are reused)."""
    runs: dict[str, Path] = {}
    for method in ["pretrain", *[m for m in learners if m != "pretrain"]]:
        out = work / f"runs-{task}-{difficulty}" / method
        runs[method] = out
        if (out / "config.json").exists() and load_config(out).finetune_steps is not None:
            continue
        config = TrainConfig(
            method=method,
            task=task,
            shape=SHAPES[task],
            iterations=PRETRAIN_ITERATIONS if method == "pretrain" else ITERATIONS,
            init_from=None if method == "pretrain" else str(runs["pretrain"]),
        )
        started = time.perf_counter()
        summary = train(index, out, config, progress=False)
        print(
            f"  {task} {method}: {summary.iterations} iterations in {time.perf_counter() - started:.0f} s "
            f"(with the budget pick), validation {summary.validation_accuracy:.3f}",
            flush=True,
        )
    return list(runs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--difficulty", default="hard", choices=("default", "hard"))
    parser.add_argument("--tasks", nargs="+", default=["classification", "segmentation"])
    parser.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    parser.add_argument("--episodes", type=int, default=30)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        started = time.perf_counter()
        index = dataset(args.work, task, args.difficulty)
        runs = train_all(args.work, index, task, args.difficulty, args.learners)
        report = evaluate(
            index,
            runs,
            args.work / f"report-{task}-{args.difficulty}",
            EvaluateConfig(shots=SHOTS, episodes=args.episodes, seed=0, n_way=4),
            progress=False,
        )
        print(f"\n{task}, {args.difficulty} ({args.episodes} test episodes, {time.perf_counter() - started:.0f} s):")
        print(report.files.table)
        print(margins(report.results).to_string(index=False, float_format="%.3f"), flush=True)


if __name__ == "__main__":
    main()
