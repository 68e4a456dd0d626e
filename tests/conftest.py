"""Session-wide sample datasets and their indexes, shared by every test module.

Small but real: files in the release layouts written by the project's generator, ingested by the
real ingest step. Generated once per session (about ten seconds in all on two cores).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypedDict

import pytest
import torch
from threadpoolctl import threadpool_limits

from geo.sample_data import SceneFiles, write_deepglobe, write_eurosat, write_scene, write_sen12ms
from pipeline.ingest import ingest

pytest_plugins = ["tests.conftest_prefect"]

SUITE_THREADS = 1
"""One thread for torch and for the BLAS/OpenMP pools everywhere the suite runs: float sums are
then added in the same order whatever the machine's core count, so seeded results agree between
machines (and with `OMP_NUM_THREADS=1`). Worker processes (Dask, Prefect) inherit the variable."""
os.environ["OMP_NUM_THREADS"] = str(SUITE_THREADS)
torch.set_num_threads(SUITE_THREADS)
threadpool_limits(SUITE_THREADS)


class Sample(TypedDict):
    """Keyword arguments of a `geo.sample_data` writer."""

    seed: int
    size: int


class RegionsSample(Sample):
    regions: int


class Sen12msSample(RegionsSample):
    patches_per_region: int


class DeepglobeSample(RegionsSample):
    images_per_region: int


class EurosatSample(RegionsSample):
    patches_per_class: int


SEN12MS = Sen12msSample(seed=0, regions=4, size=32, patches_per_region=64)
"""4 scene ids x 2 seasons = 8 (season, scene) regions of 64 patches of 32 px."""
DEEPGLOBE = DeepglobeSample(seed=0, regions=3, size=128, images_per_region=4)
"""12 images of 128 px: 192 tiles of 32 px on the default 4 x 4 grid."""
EUROSAT = EurosatSample(seed=0, regions=3, size=64, patches_per_class=4)
"""40 patches, 4 per EuroSAT class, spread over 3 UTM zones."""
SCENE = Sample(seed=0, size=128)


@pytest.fixture(scope="session")
def sen12ms_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sen12ms(tmp_path_factory.mktemp("sen12ms"), **SEN12MS)


@pytest.fixture(scope="session")
def sen12ms_index(sen12ms_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest(
        "sen12ms",
        sen12ms_root,
        tmp_path_factory.mktemp("index") / "sen12ms.parquet",
        progress=False,
    ).out


@pytest.fixture(scope="session")
def deepglobe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_deepglobe(tmp_path_factory.mktemp("deepglobe"), **DEEPGLOBE)


@pytest.fixture(scope="session")
def deepglobe_index(deepglobe_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "deepglobe.parquet"
    return ingest("deepglobe", deepglobe_root, out, progress=False).out


@pytest.fixture(scope="session")
def eurosat_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eurosat(tmp_path_factory.mktemp("eurosat"), **EUROSAT)


@pytest.fixture(scope="session")
def eurosat_index(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest("folder", eurosat_root, tmp_path_factory.mktemp("index") / "eurosat.parquet", progress=False).out


@pytest.fixture(scope="session")
def scene_files(tmp_path_factory: pytest.TempPathFactory) -> SceneFiles:
    """A 128 px new region: 13-band scene with a nodata edge, labelled points, dense truth."""
    return write_scene(tmp_path_factory.mktemp("scene"), **SCENE)


@pytest.fixture(scope="session")
def split_index(sen12ms_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SEN12MS index with metadata regions and a 60/20/20 split by scene."""
    from pipeline.regions import build_regions

    out = tmp_path_factory.mktemp("split") / "sen12ms-split.parquet"
    return build_regions(sen12ms_index, out, by="metadata", seed=0).index_path


class Training(TypedDict):
    """Keyword arguments of a `pipeline.train.TrainConfig`: how long and how often."""

    iterations: int
    validate_every: int
    validation_episodes: int
    checkpoint_every: int


TINY_TRAINING = Training(iterations=30, validate_every=10, validation_episodes=2, checkpoint_every=10)
"""Enough to tell the methods apart on the sample data, in seconds on two cores."""


@pytest.fixture(scope="session")
def trained_runs(split_index: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny segmentation runs of pretrain, then MAML, R2-D2 and ProtoNet from its weights."""
    from pipeline.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    pretraining: Training = {**TINY_TRAINING, "iterations": 60}
    runs = {
        "pretrain": train(
            split_index,
            root / "pretrain",
            TrainConfig(method="pretrain", **pretraining),
            progress=False,
        ).run_dir
    }
    for method in ("maml", "r2d2", "protonet"):
        config = TrainConfig(method=method, init_from=str(runs["pretrain"]), **TINY_TRAINING)
        runs[method] = train(split_index, root / method, config, progress=False).run_dir
    return runs
