"""The labelling loop: labelling the points `adapt --suggest` gives against labelling random points.

    python -m benchmarks.labelling_loop [--seeds 101 102 ...] [--difficulty hard] [--rounds 3] [--points 5]

Per seed, a generated new-region scene (`geo.sample_data.write_scene`, 512 px, its truth raster)
starts with 2 labelled points per class. Then, in each of `--rounds` rounds, `adapt --model
pixel` (the per-pixel classifier, as a user without a trained run has it) maps the scene, and
`--points` more points are labelled, their class read from the truth raster:

- suggested: the points `adapt --suggest` wrote (least confident, 32 px apart and from labels);
- random: points drawn uniformly from the scene's data, under the same spacing rules.

Both arms start from the same labels and map the same way. True accuracy is the map's agreement
with the truth over every pixel with data. One Markdown table: the accuracy of each arm after each
round (mean over seeds), and per seed after the last round.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio

from geo.classes import DFC10, IGNORE_INDEX
from geo.sample_data import write_scene
from pipeline.adapt import MapConfig, SuggestConfig, adapt
from pipeline.candidates import PIXEL

import os
SPACING = float(os.environ.get("SUGGEST_SPACING", "32"))
ARMS = ("suggested", "random")


def true_accuracy(map_path: Path, truth_path: Path) -> float:
    with rasterio.open(map_path) as mapped, rasterio.open(truth_path) as truth:
        predicted, actual = mapped.read(1), truth.read(1)
    scored = actual != IGNORE_INDEX
    return float((predicted[scored] == actual[scored]).mean())


def labelled_at(points: gpd.GeoDataFrame, truth_path: Path) -> gpd.GeoDataFrame:
    """`points` with their `class` read from the truth raster (the names a user would type)."""
    with rasterio.open(truth_path) as truth:
        local = points.to_crs(truth.crs)
        ids = [int(value[0]) for value in truth.sample([(p.x, p.y) for p in local.geometry])]
    return gpd.GeoDataFrame({"class": [DFC10.names[i] for i in ids]}, geometry=points.geometry, crs=points.crs)


def random_points(truth_path: Path, labels: gpd.GeoDataFrame, count: int, rng: np.random.Generator) -> gpd.GeoDataFrame:
    """`count` random pixels with data, `SPACING` apart and from the labels, as suggestions are."""
    with rasterio.open(truth_path) as truth:
        on_data = truth.read(1) != IGNORE_INDEX
        transform, crs = truth.transform, truth.crs
    local = labels.to_crs(crs)
    taken = [(~transform) * (p.x, p.y) for p in local.geometry]  # (col, row)
    rows, cols = np.nonzero(on_data)
    picked: list[tuple[float, float]] = []
    for index in rng.permutation(len(rows)):
        col, row = cols[index] + 0.5, rows[index] + 0.5
        if all(np.hypot(col - c, row - r) >= SPACING for c, r in [*taken, *picked]):
            picked.append((col, row))
            if len(picked) == count:
                break
    points = gpd.GeoSeries(gpd.points_from_xy(*zip(*[transform * p for p in picked])), crs=crs)
    return gpd.GeoDataFrame(geometry=points.to_crs(labels.crs), crs=labels.crs)


def loop(seed: int, difficulty: str, rounds: int, points: int, work: Path) -> dict[str, list[float]]:
    """Accuracy of each arm after 0..rounds rounds on one scene."""
    scene = write_scene(work / "scene", seed=seed, points_per_class=2, difficulty=difficulty)
    config = MapConfig(check=False, device="cpu", seed=seed)
    start = gpd.read_file(scene.labels)[["class", "geometry"]]
    found: dict[str, list[float]] = {}
    for arm in ARMS:
        labels, rng = start, np.random.default_rng(seed)
        accuracies = []
        for number in range(rounds + 1):
            folder = work / arm / str(number)
            folder.mkdir(parents=True)
            labels_path = folder / "labels.gpkg"
            labels.to_file(labels_path, layer="labels", driver="GPKG", engine="pyogrio")
            suggest = SuggestConfig(points, folder / "next.gpkg", SPACING) if arm == "suggested" else None
            adapt(PIXEL, scene.image, labels_path, folder / "map.tif", suggest=suggest, config=config, progress=False)
            accuracies.append(true_accuracy(folder / "map.tif", scene.truth))
            if number == rounds:
                break
            new = (
                gpd.read_file(folder / "next.gpkg")
                if arm == "suggested"
                else random_points(scene.truth, labels, points, rng)
            )
            labels = gpd.GeoDataFrame(
                pd.concat([labels, labelled_at(new, scene.truth).to_crs(labels.crs)], ignore_index=True),
                crs=labels.crs,
            )
        found[arm] = accuracies
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103, 104, 105, 106])
    parser.add_argument("--difficulty", default="hard", choices=("default", "hard"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--points", type=int, default=5, help="points labelled per round")
    args = parser.parse_args(argv)
    results = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            results[seed] = loop(seed, args.difficulty, args.rounds, args.points, Path(folder))
        print(f"seed {seed}: " + "; ".join(f"{arm} {np.round(v, 3).tolist()}" for arm, v in results[seed].items()))
    print(
        f"\n{args.difficulty} scenes, seeds {' '.join(map(str, args.seeds))}: 2 labels per class to start, "
        f"{args.points} points a round, `adapt --model pixel`; true accuracy (mean over seeds)\n"
    )
    print("| labels | " + " | ".join(f"after round {r}" if r else "start" for r in range(args.rounds + 1)) + " |")
    print("|---|" + "---|" * (args.rounds + 1))
    for arm in ARMS:
        means = np.mean([results[seed][arm] for seed in args.seeds], axis=0)
        print(f"| {arm} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    wins = sum(results[seed]["suggested"][-1] > results[seed]["random"][-1] for seed in args.seeds)
    print(f"\nsuggested beat random after the last round on {wins} of {len(args.seeds)} seeds")
    print("\n| seed | suggested | random |\n|---|---|---|")
    for seed in args.seeds:
        print(f"| {seed} | {results[seed]['suggested'][-1]:.3f} | {results[seed]['random'][-1]:.3f} |")


if __name__ == "__main__":
    main()
