"""The labelling loop: labelling the points `adapt --suggest` gives against labelling random points.

    python -m benchmarks.labelling_loop [--seeds 101 102 ...] [--difficulty hard] [--rounds 3] [--points 5]
                                        [--draws 5]

Per seed, a generated new-region scene (`geo.sample_data.write_scene`, 512 px, its truth raster)
starts with 2 labelled points per class. Then, in each of `--rounds` rounds, `adapt --model
pixel` (the per-pixel classifier, as a user without a trained run has it) maps the scene, and
`--points` more points are labelled, their class read from the truth raster:

- suggested: the points `adapt --suggest` wrote (32 px apart and from the labels);
- random: points drawn uniformly from the scene's data under the same spacing rules, in `--draws`
  independent draws whose accuracies are averaged (one draw of 5 points is too noisy to compare).

Both arms start from the same labels and map the same way. True accuracy is the map's agreement
with the truth over every pixel with data. Printed: each scene's accuracies, a Markdown table of
the mean over scenes after each round, and the mean gain of suggested over random after the last
round with its 95% bootstrap interval over scenes.
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
from geo.sample_data import SceneFiles, write_scene
from pipeline.adapt import MapConfig, SuggestConfig, adapt
from pipeline.candidates import PIXEL

SPACING = 32.0
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


def run_arm(
    scene: SceneFiles, start: gpd.GeoDataFrame, rounds: int, points: int, rng: np.random.Generator | None, work: Path
) -> list[float]:
    """True accuracy after 0..rounds rounds of labelling: the suggested points (`rng` None), or
    random ones drawn with `rng`."""
    config = MapConfig(check=False, device="cpu", seed=0)
    labels, accuracies = start, []
    for number in range(rounds + 1):
        folder = work / str(number)
        folder.mkdir(parents=True)
        labels_path = folder / "labels.gpkg"
        labels.to_file(labels_path, layer="labels", driver="GPKG", engine="pyogrio")
        suggest = SuggestConfig(points, folder / "next.gpkg", SPACING) if rng is None else None
        adapt(PIXEL, scene.image, labels_path, folder / "map.tif", suggest=suggest, config=config, progress=False)
        accuracies.append(true_accuracy(folder / "map.tif", scene.truth))
        if number == rounds:
            break
        new = gpd.read_file(folder / "next.gpkg") if rng is None else random_points(scene.truth, labels, points, rng)
        labels = gpd.GeoDataFrame(
            pd.concat([labels, labelled_at(new, scene.truth).to_crs(labels.crs)], ignore_index=True), crs=labels.crs
        )
    return accuracies


def loop(seed: int, difficulty: str, rounds: int, points: int, draws: int, work: Path) -> dict[str, list[float]]:
    """Accuracy after 0..rounds rounds on one scene: suggested points, and random points (the mean
    over `draws` independent draws: one draw of 5 points is too noisy to compare with)."""
    scene = write_scene(work / "scene", seed=seed, points_per_class=2, difficulty=difficulty)
    start = gpd.read_file(scene.labels)[["class", "geometry"]]
    suggested = run_arm(scene, start, rounds, points, None, work / "suggested")
    randoms = [
        run_arm(scene, start, rounds, points, np.random.default_rng([seed, draw]), work / f"random-{draw}")
        for draw in range(draws)
    ]
    return {"suggested": suggested, "random": np.mean(randoms, axis=0).tolist()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(101, 121)))
    parser.add_argument("--difficulty", default="hard", choices=("default", "hard"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--points", type=int, default=5, help="points labelled per round")
    parser.add_argument("--draws", type=int, default=5, help="random draws per scene, averaged")
    args = parser.parse_args(argv)
    results = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            results[seed] = loop(seed, args.difficulty, args.rounds, args.points, args.draws, Path(folder))
        print(f"seed {seed}: " + "; ".join(f"{arm} {np.round(v, 3).tolist()}" for arm, v in results[seed].items()))
    print(
        f"\n{args.difficulty} scenes, seeds {args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)}): 2 labels per class "
        f"to start, {args.points} points a round, `adapt --model pixel`; true accuracy, mean over the scenes "
        f"(random: the mean of {args.draws} draws per scene)\n"
    )
    print("| labels | " + " | ".join(f"after round {r}" if r else "start" for r in range(args.rounds + 1)) + " |")
    print("|---|" + "---|" * (args.rounds + 1))
    for arm in ARMS:
        means = np.mean([results[seed][arm] for seed in args.seeds], axis=0)
        print(f"| {arm} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    gains = np.array([results[seed]["suggested"][-1] - results[seed]["random"][-1] for seed in args.seeds])
    low, high = bootstrap_interval(gains)
    print(
        f"\nafter the last round, suggested minus random: {gains.mean():+.3f} "
        f"(95% bootstrap interval over scenes {low:+.3f} to {high:+.3f}); "
        f"suggested ahead on {int((gains > 0).sum())} of {len(gains)} scenes"
    )


def bootstrap_interval(values: np.ndarray, resamples: int = 10_000) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mean of `values` (fixed seed: the same figures)."""
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


if __name__ == "__main__":
    main()
