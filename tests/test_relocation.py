"""An index keeps paths relative to its dataset root: moved with its dataset, or pointed at the
dataset's new place with --root, it gives what it gave before the move."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from geo.index import read_index
from pipeline.cli import app
from pipeline.evaluate import EvaluateConfig, evaluate
from pipeline.ingest import ingest
from pipeline.protocol import EpisodeShape
from pipeline.regions import build_regions
from pipeline.train import TrainConfig, train

runner = CliRunner()
SHAPE = EpisodeShape(n_way=2, k_shot=2, q_queries=2)
TRAINING = TrainConfig(
    method="pretrain",
    task="classification",
    shape=SHAPE,
    iterations=4,
    validate_every=4,
    validation_episodes=1,
    checkpoint_every=4,
    device="cpu",
)
"""Patch classification: the quickest training that reads every kind of file an index names."""
EVALUATION = EvaluateConfig(shots=(0, 1), episodes=2, validation_episodes=1, device="cpu", n_way=2, q_queries=2)


def flat(output: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def run_all(folder: Path, index: Path, root: Path | None = None) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Regions, train and evaluate from `index`: the split, the trained weights, the scores."""
    regions = build_regions(index, folder / "regions.parquet", seed=0, root=root).index_path
    run = train(regions, folder / "run", TRAINING, progress=False, root=root).run_dir
    report = evaluate(regions, [run], folder / "report", EVALUATION, progress=False, root=root)
    saved = torch.load(run / "weights.pt", weights_only=True)
    weights = {f"{part}.{name}": tensor for part, tensors in saved.items() for name, tensor in tensors.items()}
    scores = report.results.drop(
        columns=[c for c in report.results.columns if c.endswith("seconds") or "per_iteration" in c]
    )
    return read_index(regions, root)[0][["region", "split"]], weights, scores


@pytest.fixture
def indexed(sen12ms_root: Path, tmp_path: Path) -> Path:
    """A copy of the SEN12MS sample with its index inside the project folder `before/`."""
    shutil.copytree(sen12ms_root, tmp_path / "before" / "data")
    ingest("sen12ms", tmp_path / "before" / "data", tmp_path / "before" / "index.parquet", progress=False)
    return tmp_path / "before"


def test_an_index_moved_with_its_dataset_gives_the_same_results(indexed: Path, tmp_path: Path) -> None:
    first = pq.read_table(indexed / "index.parquet").column("path").to_pylist()[0]
    assert first is not None and first.startswith("ROIs") and not Path(first).is_absolute()
    before = run_all(indexed / "results", indexed / "index.parquet")
    moved = tmp_path / "elsewhere" / "project"
    shutil.move(indexed, moved)
    frame, metadata = read_index(moved / "index.parquet")
    assert metadata["root"] == str(moved / "data") and Path(frame["path"].iloc[0]).is_file()
    after = run_all(tmp_path / "after", moved / "index.parquet")
    assert after[0].equals(before[0])
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][name], before[1][name]) for name in before[1])
    assert after[2].equals(before[2])


def test_a_dataset_moved_away_from_its_index_is_found_with_root(indexed: Path, tmp_path: Path) -> None:
    index = indexed / "index.parquet"
    regions = build_regions(index, tmp_path / "regions.parquet", seed=0).index_path
    shutil.move(indexed / "data", tmp_path / "shared-drive")
    command = [
        "train",
        str(regions),
        "--method",
        "pretrain",
        "--task",
        "classification",
        "--n-way",
        "2",
        "--shots",
        "2",
        "--queries",
        "2",
        "--iterations",
        "2",
        "--validate-every",
        "2",
        "--validation-episodes",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
    ]
    lost = runner.invoke(app, command)
    assert lost.exit_code == 1 and not (tmp_path / "run").exists()
    assert flat(lost.stderr) == (
        f"error: {regions}: its dataset folder {indexed / 'data'} is not there (moved?): give its new place with --root"
    )
    found = runner.invoke(app, [*command, "--root", str(tmp_path / "shared-drive")])
    assert found.exit_code == 0, found.output
    again = runner.invoke(
        app, ["regions", str(index), "--root", str(tmp_path / "shared-drive"), "--out", str(tmp_path / "again.parquet")]
    )
    assert again.exit_code == 0
    frame, metadata = read_index(tmp_path / "again.parquet")  # the new root is recorded
    assert metadata["root"] == str(tmp_path / "shared-drive") and Path(frame["label_path"].iloc[0]).is_file()
    nowhere = runner.invoke(app, [*command, "--root", str(tmp_path / "nowhere")])
    assert nowhere.exit_code == 1 and nowhere.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'nowhere'}: no such folder"
    )
