"""Adaptation quality on generated new-region scenes: every candidate's true accuracy against the
dense truth, the candidate `landcover adapt` picks by default, and how close its cross-validated
estimate comes to the truth.

    python -m benchmarks.adapt_scenes --difficulty hard --seeds 101 102 103 --work /tmp/adapt-bench

Trains once per difficulty on SEN12MS-layout sample data of that difficulty (pretrain, then
R2-D2 and MAML from the pretrained weights, as the README does), then for each scene seed maps
the scene with each candidate fitted on its 5 labelled points per class. Races between methods
live here, with their figures in BENCHMARKS.md, never in the test suite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

from geo.sample_data import write_scene, write_sen12ms
from models.checkpoint import load_config
from pipeline.adapt import MapConfig, adapt
from pipeline.ingest import ingest
from pipeline.regions import build_regions
from pipeline.train import TrainConfig, train

ITERATIONS = {"pretrain": 300, "r2d2": 150, "maml": 150}
"""Training length per method; R2-D2 and MAML start from the pretrained weights."""


def train_runs(work: Path, difficulty: str, size: int, methods: list[str]) -> dict[str, Path]:
    """Sample data of this difficulty, ingested and split, and the runs (finished ones reused)."""
    data = work / f"sen12ms-{difficulty}"
    index = work / f"index-{difficulty}.parquet"
    if not index.exists():
        write_sen12ms(data, seed=0, regions=8, size=size, difficulty=difficulty)
        ingest("sen12ms", data, index, progress=False)
        build_regions(index, index, by="metadata", split=(0.6, 0.2, 0.2), seed=0)
    runs: dict[str, Path] = {}
    for method in ["pretrain", *[m for m in methods if m != "pretrain"]]:
        out = work / f"runs-{difficulty}" / method
        runs[method] = out
        if (out / "config.json").exists() and load_config(out).finetune_steps is not None:
            continue
        init = str(runs["pretrain"]) if method != "pretrain" else None
        started = time.perf_counter()
        config = TrainConfig(method=method, iterations=ITERATIONS[method], init_from=init)
        train(index, out, config, progress=False)
        print(f"  trained {method} ({difficulty}) in {time.perf_counter() - started:.0f} s", flush=True)
    return runs


def truth_accuracy(map_path: Path, truth_path: Path) -> float:
    with rasterio.open(map_path) as predicted, rasterio.open(truth_path) as truth:
        classes, expected = predicted.read(1), truth.read(1)
    scored = expected != 255
    return float((classes[scored] == expected[scored]).mean())


def scene_rows(runs: dict[str, Path], difficulty: str, seed: int, size: int, work: Path) -> list[dict]:
    """One row per candidate on one scene: true accuracy, CV estimate, whether the default adapt
    (`--model` R2-D2, the pixel classifier beside it) picked it. The other runs are scored on the
    same folds but are not candidates of the default adapt."""
    scene = write_scene(work / f"scene-{difficulty}-{seed}", seed=seed, size=size, difficulty=difficulty)
    others = [path for method, path in runs.items() if method != "r2d2"]
    default = adapt(
        runs["r2d2"],
        scene.image,
        scene.labels,
        work / "maps" / f"{difficulty}-{seed}-default.tif",
        config=MapConfig(device="cpu"),
    )
    checked = adapt(
        runs["r2d2"],
        scene.image,
        scene.labels,
        work / "maps" / f"{difficulty}-{seed}-all.tif",
        compare=others,
        config=MapConfig(device="cpu"),
    )
    assert default.report is not None and checked.report is not None
    estimates = {c["name"]: c["estimate"] for c in checked.report.content["candidates"]}
    rows = []
    for name, estimate in estimates.items():
        single = adapt(
            runs["r2d2"],
            scene.image,
            scene.labels,
            work / "maps" / f"{difficulty}-{seed}-{name.replace(' ', '_')}.tif",
            compare=others,
            config=MapConfig(device="cpu", check=False, pick=name),
        )
        rows.append(
            {
                "difficulty": difficulty,
                "seed": seed,
                "candidate": name,
                "truth": truth_accuracy(single.scene_map.classes, scene.truth),
                "cv": float("nan") if estimate is None else estimate["accuracy"],
                "chosen": name == default.chosen,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--difficulty", nargs="+", default=["default", "hard"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[101, 102, 103])
    parser.add_argument("--size", type=int, default=512, help="scene side in pixels")
    parser.add_argument("--patch", type=int, default=32, help="SEN12MS patch side for training")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--methods", nargs="+", default=["pretrain", "r2d2", "maml"])
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="adapt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for difficulty in args.difficulty:
        runs = train_runs(work, difficulty, args.patch, args.methods)
        for seed in args.seeds:
            rows += scene_rows(runs, difficulty, seed, args.size, work)
            _print_table(rows)
    _print_table(rows)


def _print_table(rows: list[dict]) -> None:
    print("\n| difficulty | seed | candidate | true accuracy | CV estimate | chosen |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['difficulty']} | {row['seed']} | {row['candidate']} | {row['truth']:.3f} | "
            f"{row['cv']:.3f} | {'**yes**' if row['chosen'] else ''} |"
        )
    for difficulty in sorted({row["difficulty"] for row in rows}):
        for seed in sorted({row["seed"] for row in rows if row["difficulty"] == difficulty}):
            scene = [row for row in rows if row["difficulty"] == difficulty and row["seed"] == seed]
            chosen = next(row for row in scene if row["chosen"])
            pixel = next(row for row in scene if row["candidate"] == "pixel")
            print(
                f"{difficulty} seed {seed}: adapt picks {chosen['candidate']} {chosen['truth']:.3f} "
                f"(pixel {pixel['truth']:.3f}, margin {chosen['truth'] - pixel['truth']:+.3f}; "
                f"CV error {chosen['cv'] - chosen['truth']:+.3f})"
            )
    print(f"mean over rows: {np.mean([r['truth'] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
