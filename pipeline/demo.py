"""`make demo`: the whole pipeline on generated sample data, each step the one the CLI runs.

    python -m pipeline.demo [OUT_DIR]

Generates SEN12MS-layout tiles and a new-region scene in the generator's hard setting (low class
contrast, noisy and mixed pixels, strong shift between regions), ingests and splits them,
pretrains a baseline and trains ProtoNet, MAML, Reptile and ANIL from it, evaluates every
candidate (each run by its own adaptation and with a closed-form head, random init, the
per-pixel classifier) on the same held-out scene episodes, with each method's cost, and adapts to
the new scene from its few labelled points: every candidate is cross-validated on those labels,
the best maps the scene, and the report says how good it is; the map's confidence and 5 points
to label next come with it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import rasterio

from geo.classes import IGNORE_INDEX
from geo.sample_data import write_scene, write_sen12ms
from pipeline.adapt import SuggestConfig, adapt
from pipeline.evaluate import EvaluateConfig, evaluate, margins
from pipeline.ingest import ingest
from pipeline.protocol import EpisodeShape, load_split_index
from pipeline.regions import build_regions
from pipeline.train import TrainConfig, train
from tasks.episodes import ClassificationSampler, capable_regions
from tasks.splits import SPLITS

DEMO_SEED = 0
DEMO_DIFFICULTY = "hard"
DEMO_ITERATIONS = {"pretrain": 300, "protonet": 100, "maml": 100, "reptile": 100, "anil": 100}
"""Pretrain first: the learners start from the pretrained weights (a good feature extractor to
start from, so a CPU-sized budget goes into learning to adapt). The other learners
(`landcover train --method metasgd|mamlpp|maml-ga|fomaml|r2d2`) train the same way; their figures
are in BENCHMARKS.md."""
ADAPTS_WITH, COMPARED_WITH = "protonet", ("pretrain", "maml")


def say(message: str) -> None:
    print(message, flush=True)


def episode_supply(index_path: Path, shape: EpisodeShape) -> None:
    """Print what each split can supply: regions able to give episodes, disjoint classification ones."""
    data = load_split_index(index_path)
    for split in SPLITS:
        rows = data.split(split)
        regions = sorted(rows["region"].unique())
        segmentation = capable_regions(data.sampler(split, "segmentation", shape), regions)
        classification = ClassificationSampler(rows, data.tiles, n_way=shape.n_way, k_shot=1, q_queries=5)
        disjoint = sum(classification.disjoint_episodes(region) for region in regions)
        say(
            f"  {split:5s}: {len(regions)} regions, {len(rows)} tiles; segmentation episodes "
            f"({shape.n_way}-way, up to {shape.k_shot} px/class) from {len(segmentation)} regions; "
            f"{disjoint} disjoint 4-way 1-shot classification episodes"
        )


def main(out: Path) -> None:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    say(f"1/6 sample data -> {out}")
    sen12ms = write_sen12ms(out / "sen12ms", seed=DEMO_SEED, regions=8, difficulty=DEMO_DIFFICULTY)
    scene = write_scene(out / "scene", seed=DEMO_SEED, difficulty=DEMO_DIFFICULTY)

    say("2/6 ingest")
    index = out / "index.parquet"
    summary = ingest("sen12ms", sen12ms, index, progress=False)
    say(f"  {summary.rows} tiles, {summary.tiles_per_second:.0f} tiles/s, {len(summary.skipped)} skipped")

    say("3/6 regions and splits")
    build_regions(index, index, by="metadata", split=(0.6, 0.2, 0.2), seed=DEMO_SEED)
    shape = EpisodeShape(n_way=4, k_shot=10, query_tiles=2)
    episode_supply(index, shape)

    say("4/6 train")
    runs: dict[str, Path] = {}
    for method, iterations in DEMO_ITERATIONS.items():
        init_from = str(runs["pretrain"]) if method != "pretrain" else None
        config = TrainConfig(
            method=method,
            task="segmentation",
            iterations=iterations,
            seed=DEMO_SEED,
            init_from=init_from,
        )
        result = train(index, out / "runs" / method, config)
        runs[method] = result.run_dir
        adapts = (
            f"by {result.finetune_steps} fine-tuning steps"
            if result.adaptation.startswith("finetune")
            else f"by its {result.adaptation}"
        )
        say(
            f"  {method}: {result.iterations} iterations in {result.seconds:.0f} s, validation "
            f"accuracy {result.validation_accuracy:.3f}, adapts {adapts}"
        )

    say("5/6 evaluate (same test scene episodes for every candidate; costs: training s/iteration, s to adapt)")
    report = evaluate(index, list(runs.values()), out / "report", EvaluateConfig(episodes=20, seed=DEMO_SEED))
    say(report.files.table)
    summary_rows = margins(report.results)
    for row in summary_rows[summary_rows["shots"] > 0].itertuples():
        say(
            f"  {row.shots} shot(s): best learner {row.best} {row.accuracy:.3f}, "
            f"per-pixel classifier {row.classical:.3f} ({row.margin:+.3f})"
        )
    say(f"  plot: {report.files.plot}")

    say("6/6 adapt to the new scene from its labelled points (every candidate cross-validated on them)")
    maps = out / "maps"
    adapted = adapt(
        runs[ADAPTS_WITH],
        scene.image,
        scene.labels,
        maps / "map.tif",
        compare=[runs[name] for name in COMPARED_WITH],
        vector=maps / "map.gpkg",
        probabilities=maps / "map-probabilities.tif",
        confidence=maps / "confidence.tif",
        suggest=SuggestConfig(count=5, out=maps / "next.gpkg"),
    )
    assert adapted.report is not None
    for candidate in adapted.report.content["candidates"]:
        estimate = candidate["estimate"]
        figure = (
            "no estimate"
            if estimate is None
            else f"{estimate['accuracy']:.3f} (95% {estimate['ci95'][0]:.3f}-{estimate['ci95'][1]:.3f})"
        )
        say(f"  {'*' if candidate['name'] == adapted.chosen else ' '} {candidate['name']}: cross-validated {figure}")
    accuracy = map_accuracy(adapted.scene_map.classes, scene.truth)
    say(
        f"  map made by {adapted.chosen} from {adapted.labelled_pixels} labelled pixels: accuracy against "
        f"the truth raster {accuracy:.3f}; report {adapted.report.markdown}"
    )
    say(f"open {maps / 'map.tif'} in QGIS: its style {maps / 'map.qml'} names and colours the classes")
    say(
        f"  {maps / 'confidence.tif'} shows where the map is unsure; {maps / 'next.gpkg'} holds "
        f"{len(adapted.suggestions or ())} points to label next (README: the labelling loop)"
    )
    say(f"done in {time.perf_counter() - started:.0f} s")


def map_accuracy(map_path: Path, truth_path: Path) -> float:
    """Share of the truth raster's labelled pixels that the map gets right."""
    with rasterio.open(map_path) as predicted, rasterio.open(truth_path) as truth:
        classes, expected = predicted.read(1), truth.read(1)
    labelled = expected != IGNORE_INDEX
    return float((classes[labelled] == expected[labelled]).mean())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
