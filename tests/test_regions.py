"""Regions (metadata, KMeans), region splits and the `landcover regions` command, on real
generated files ingested by the real ingest step."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from geo.errors import DataError
from geo.index import read_index, write_index
from geo.sample_data import deepglobe_regions, write_deepglobe
from geo.sources.sen12ms import Sen12ms
from pipeline.cli import app
from pipeline.ingest import ingest
from pipeline.regions import build_regions
from tasks.regions import regions_by_kmeans, regions_by_metadata, tile_features
from tasks.splits import (
    SPLITS,
    group_counts,
    parse_fractions,
    split_by_fractions,
    split_explicit,
    split_groups,
)
from tests.conftest import DEEPGLOBE, SEN12MS

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def assert_no_leak(frame: pd.DataFrame) -> None:
    """No region, and no SEN12MS scene id, in two splits; every row has a split."""
    assert frame["split"].isin(SPLITS).all()
    assert (frame.groupby("region")["split"].nunique() == 1).all()
    if set(frame["source"]) == {"sen12ms"}:
        assert (frame.groupby("scene")["split"].nunique() == 1).all()


# --- regions by metadata ------------------------------------------------------------------


def test_sen12ms_regions_are_season_scene_pairs_and_no_scene_spans_two_splits(sen12ms_index, tmp_path):
    summary = build_regions(sen12ms_index, tmp_path / "regions.parquet", seed=3)
    frame, metadata = read_index(summary.index_path)

    expected = frame["season"] + "/" + frame["scene"]
    assert (frame["region"] == expected).all()
    assert frame["region"].nunique() == SEN12MS["regions"] * 2  # each scene id in two seasons
    assert_no_leak(frame)
    # 4 scene ids at 0.6/0.2/0.2 -> 2/1/1 scenes, i.e. 4/2/2 (season, scene) regions
    assert summary.regions_per_split == {"train": 4, "val": 2, "test": 2}
    assert sum(summary.tiles_per_split.values()) == len(frame)
    assert metadata["regions"]["method"] == "metadata"
    assert metadata["regions"]["seed"] == 3


def test_splits_keep_regions_and_scene_ids_whole_for_every_seed(sen12ms_index):
    frame, _ = read_index(sen12ms_index)
    regions = regions_by_metadata(frame, Sen12ms())
    groups = split_groups(frame, regions, Sen12ms.split_together)
    assert groups.nunique() == SEN12MS["regions"]  # one group per scene id, both seasons in it
    seen = set()
    for seed in range(25):
        splits = split_by_fractions(groups, (0.5, 0.25, 0.25), seed=seed)
        assert_no_leak(frame.assign(region=regions.to_numpy(), split=splits.to_numpy()))
        assert set(splits) == set(SPLITS)
        seen.add(tuple(splits.groupby(frame["scene"]).first().sort_index()))
    assert len(seen) > 1  # the seed does move scenes between splits
    # same seed, same assignment
    assert split_by_fractions(groups, seed=7).equals(split_by_fractions(groups, seed=7))


def test_eurosat_regions_are_utm_zones_from_the_files(eurosat_index, tmp_path):
    summary = build_regions(eurosat_index, tmp_path / "eurosat.parquet")
    frame, _ = read_index(summary.index_path)

    assert frame["region"].nunique() == 3
    assert frame["region"].str.fullmatch(r"EPSG:32[67]\d\d").all()  # UTM north/south zones
    for path, region in zip(frame["path"].head(12), frame["region"].head(12)):
        with rasterio.open(path) as dataset:
            assert dataset.crs.to_string() == region
    assert_no_leak(frame)
    assert summary.regions_per_split == {"train": 1, "val": 1, "test": 1}


def test_named_column_gives_the_regions(sen12ms_index, tmp_path):
    frame, metadata = read_index(sen12ms_index)
    frame["province"] = np.where(frame["scene"].isin(sorted(frame["scene"].unique())[:2]), "north", "south")
    frame.loc[frame["season"] == frame["season"].min(), "province"] += "-early"
    index = write_index(frame, tmp_path / "with_province.parquet", metadata)

    summary = build_regions(index, tmp_path / "out.parquet", column="province", split=(0.5, 0.5, 0.0))
    result, saved = read_index(summary.index_path)
    assert (result["region"] == result["province"]).all()
    assert saved["regions"] == {**saved["regions"], "method": "metadata", "column": "province"}
    # the regions share scene ids across seasons, so whole scenes drag regions together
    assert_no_leak(result)
    assert summary.regions_per_split["test"] == 0


def test_bad_metadata_requests_name_the_problem(sen12ms_index, deepglobe_index, tmp_path):
    with pytest.raises(DataError, match="no column 'province'"):
        build_regions(sen12ms_index, tmp_path / "a.parquet", column="province")
    with pytest.raises(DataError, match="column 'crs'") as missing:
        build_regions(deepglobe_index, tmp_path / "b.parquet", column="crs")
    assert "no value in 192 of 192 rows" in str(missing.value)
    with pytest.raises(DataError, match="kmeans"):
        build_regions(deepglobe_index, tmp_path / "c.parquet")
    assert not (tmp_path / "a.parquet").exists() and not (tmp_path / "c.parquet").exists()


# --- KMeans --------------------------------------------------------------------------------


def image_ari(frame: pd.DataFrame, truth: dict[str, int]) -> float:
    return adjusted_rand_score(frame["scene"].map(truth), frame["region"])


def test_kmeans_recovers_generated_deepglobe_regions(deepglobe_index, tmp_path):
    summary = build_regions(deepglobe_index, tmp_path / "dg.parquet", by="kmeans", seed=0)
    frame, metadata = read_index(summary.index_path)
    truth = deepglobe_regions(
        seed=DEEPGLOBE["seed"], regions=DEEPGLOBE["regions"], images_per_region=DEEPGLOBE["images_per_region"]
    )
    ari = image_ari(frame, truth)
    print(f"DeepGlobe KMeans (3 generated regions, k by silhouette): ARI {ari:.3f}")
    assert ari >= 0.9
    assert summary.k == DEEPGLOBE["regions"]  # the silhouette picked the generated number
    assert summary.unit == "scene"
    assert (frame.groupby("scene")["region"].nunique() == 1).all()  # an image is never cut
    assert_no_leak(frame)
    saved = metadata["regions"]
    assert saved["method"] == "kmeans" and saved["unit"] == "scene" and saved["units"] == 12
    assert np.asarray(saved["centres"]).shape == (3, len(metadata["feature_names"]))
    assert max(saved["silhouette_by_k"], key=saved["silhouette_by_k"].get) == "3"


def test_kmeans_on_images_recovers_six_regions_where_tiles_do_not(tmp_path):
    """Six generated regions of three images each: clustering image means finds them all."""
    regions, per_region = 6, 3
    root = write_deepglobe(tmp_path / "dg6", seed=0, regions=regions, size=128, images_per_region=per_region)
    index = ingest("deepglobe", root, tmp_path / "dg6.parquet", progress=False).out
    truth = deepglobe_regions(seed=0, regions=regions, images_per_region=per_region)

    summary = build_regions(index, tmp_path / "dg6-regions.parquet", by="kmeans", seed=0)
    frame, _ = read_index(summary.index_path)
    ari = image_ari(frame, truth)
    tile_level = regions_by_kmeans(tile_features(frame), k=regions, seed=0)
    tile_ari = adjusted_rand_score(frame["scene"].map(truth), tile_level.labels)
    print(f"DeepGlobe KMeans (6 generated regions): ARI {ari:.3f} on image means, {tile_ari:.3f} on tiles")
    assert summary.k == regions
    assert ari >= 0.9


def test_kmeans_is_seeded_and_reproducible(deepglobe_index):
    frame, _ = read_index(deepglobe_index)
    features = tile_features(frame)
    first = regions_by_kmeans(features, seed=5, groups=frame["scene"], unit="scene")
    again = regions_by_kmeans(features, seed=5, groups=frame["scene"], unit="scene")
    assert np.array_equal(first.labels, again.labels)
    assert np.array_equal(first.centres, again.centres)
    assert first.silhouette_by_k == again.silhouette_by_k
    # clusters are numbered by first appearance, and the centres follow the numbering
    assert first.labels[0] == 0
    means = pd.DataFrame(features).groupby(frame["scene"].to_numpy()).mean()
    image_of = frame["scene"].to_numpy()
    for cluster in range(first.k):
        members = means.loc[sorted(set(image_of[first.labels == cluster]))].to_numpy()
        centre = members.mean(axis=0)
        assert np.allclose((centre - first.feature_mean) / first.feature_scale, first.centres[cluster])


def test_kmeans_k_out_of_range_is_a_clear_error(deepglobe_index, tmp_path):
    with pytest.raises(DataError, match=r"k=13 must be between 1 and the number of scene values \(12\)"):
        build_regions(deepglobe_index, tmp_path / "x.parquet", by="kmeans", k=13)
    summary = build_regions(deepglobe_index, tmp_path / "y.parquet", by="kmeans", k=4, seed=1)
    frame, metadata = read_index(summary.index_path)
    assert frame["region"].nunique() == 4 and metadata["regions"]["silhouette_by_k"] == {}


def test_kmeans_tiles_of_sen12ms_that_mix_scenes_cannot_be_split(sen12ms_index, tmp_path):
    """Tile clusters spanning scene ids would leak a scene into two splits: refused, with a hint;
    clustering whole scenes (--column scene) works and leaks nothing."""
    with pytest.raises(DataError, match="--column scene"):
        build_regions(sen12ms_index, tmp_path / "tiles.parquet", by="kmeans", k=4)
    summary = build_regions(
        sen12ms_index, tmp_path / "scenes.parquet", by="kmeans", column="scene", k=3, split=(0.34, 0.33, 0.33)
    )
    frame, _ = read_index(summary.index_path)
    assert frame["region"].nunique() == 3
    assert_no_leak(frame)


# --- splits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "fractions", "expected"),
    [
        (10, (0.6, 0.2, 0.2), [6, 2, 2]),
        (4, (0.6, 0.2, 0.2), [2, 1, 1]),
        (3, (0.6, 0.2, 0.2), [1, 1, 1]),
        (7, (1.0, 0.0, 0.0), [7, 0, 0]),
        (5, (0.5, 0.5, 0.0), [3, 2, 0]),
        (9, (0.7, 0.1, 0.2), [6, 1, 2]),
    ],
)
def test_group_counts(total, fractions, expected):
    counts = group_counts(total, fractions)
    assert counts == expected and sum(counts) == total


def test_too_few_regions_for_the_splits():
    with pytest.raises(ValueError, match="2 region groups cannot fill 3 non-empty splits"):
        group_counts(2, (0.6, 0.2, 0.2))


@pytest.mark.parametrize("text", ["0.6,0.2", "a,b,c", "0.7,0.2,0.2", "1.2,-0.1,-0.1", "nan,0.5,0.5"])
def test_parse_fractions_rejects(text):
    with pytest.raises(ValueError, match="split"):
        parse_fractions(text)


def test_explicit_split_lists(sen12ms_index, tmp_path):
    frame, _ = read_index(sen12ms_index)
    regions = regions_by_metadata(frame, Sen12ms())
    scenes = sorted(frame["scene"].unique())
    by_scene = {scene: sorted(regions[frame["scene"] == scene].unique()) for scene in scenes}
    lists = {
        "train": by_scene[scenes[0]] + by_scene[scenes[1]],
        "val": by_scene[scenes[2]],
        "test": by_scene[scenes[3]],
    }

    summary = build_regions(sen12ms_index, tmp_path / "explicit.parquet", split=lists)
    result, metadata = read_index(summary.index_path)
    for split, members in lists.items():
        assert set(result.loc[result["split"] == split, "region"]) == set(members)
    assert metadata["regions"]["split"] == {name: sorted(lists[name]) for name in SPLITS}
    assert_no_leak(result)

    groups = split_groups(frame, regions, Sen12ms.split_together)
    leaky = {"train": lists["train"] + [by_scene[scenes[2]][0]], "val": [by_scene[scenes[2]][1]], "test": lists["test"]}
    with pytest.raises(ValueError, match="share a split") as error:
        split_explicit(regions, leaky, groups)
    assert by_scene[scenes[2]][0] in str(error.value) and by_scene[scenes[2]][1] in str(error.value)
    with pytest.raises(ValueError, match="not assigned to any split: " + by_scene[scenes[3]][0]):
        split_explicit(regions, {**lists, "test": []}, groups)
    with pytest.raises(ValueError, match="not in the index: nowhere/1"):
        split_explicit(regions, {**lists, "test": lists["test"] + ["nowhere/1"]}, groups)
    with pytest.raises(ValueError, match="listed in both train and val"):
        split_explicit(regions, {**lists, "val": lists["val"] + lists["train"][:1]}, groups)
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        split_explicit(regions, {**lists, "holdout": []}, groups)


# --- the `landcover regions` command --------------------------------------------------------


def test_cli_regions_metadata_writes_region_and_split(sen12ms_index, tmp_path):
    out = tmp_path / "cli.parquet"
    result = runner.invoke(
        app, ["regions", str(sen12ms_index), "--by", "metadata", "--split", "0.5,0.25,0.25", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "train: 4 regions, 256 tiles" in result.output
    frame, _ = read_index(out)
    assert {"region", "split"} <= set(frame.columns)
    assert_no_leak(frame)
    assert read_index(sen12ms_index)[0].columns.equals(frame.columns.drop(["region", "split"]))


def test_cli_regions_kmeans_writes_plot_and_centres(deepglobe_index, tmp_path):
    out = tmp_path / "dg.parquet"
    result = runner.invoke(app, ["regions", str(deepglobe_index), "--by", "kmeans", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "k=3, clustered by scene" in result.output
    plot = tmp_path / "dg.regions.png"
    assert f"regions plot: {plot}" in result.output
    with Image.open(plot) as image:
        assert image.format == "PNG" and min(image.size) >= 300
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10  # a drawn figure, not a blank canvas
    frame, metadata = read_index(out)
    assert frame["region"].nunique() == 3 and frame["split"].nunique() == 3
    assert len(metadata["regions"]["centres"]) == 3
    assert len(metadata["regions"]["feature_mean"]) == len(metadata["feature_names"])


def test_cli_regions_split_file(sen12ms_index, tmp_path):
    frame, _ = read_index(sen12ms_index)
    scenes = sorted(frame["scene"].unique())
    regions = frame["season"] + "/" + frame["scene"]
    members = {scene: sorted(regions[frame["scene"] == scene].unique()) for scene in scenes}
    lists = {
        "train": members[scenes[0]] + members[scenes[1]] + members[scenes[2]],
        "val": [],
        "test": members[scenes[3]],
    }
    split_file = tmp_path / "regions.json"
    split_file.write_text(json.dumps(lists))
    out = tmp_path / "split.parquet"
    result = runner.invoke(app, ["regions", str(sen12ms_index), "--split-file", str(split_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    written, _ = read_index(out)
    assert set(written.loc[written["split"] == "test", "region"]) == set(lists["test"])
    assert "val: 0 regions, 0 tiles" in result.output

    yaml_file = tmp_path / "regions.yaml"
    yaml_file.write_text(f"train: [{', '.join(lists['train'])}]\ntest: [{lists['test'][0]}]\n")
    result = runner.invoke(
        app, ["regions", str(sen12ms_index), "--split-file", str(yaml_file), "--out", str(tmp_path / "y.parquet")]
    )
    assert result.exit_code == 1
    assert "error:" in result.output and f"not assigned to any split: {lists['test'][1]}" in flat(result.output)
    assert not (tmp_path / "y.parquet").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--split", "0.5,0.5"], "summing to 1"),
        (["--split", "0.6,0.2,0.3"], "summing to 1"),
        (["--split", "x,y,z"], "comma-separated numbers"),
        (["--by", "voronoi"], "is not one of 'metadata', 'kmeans'"),
        (["--split", "0.6,0.2,0.2", "--split-file", "r.yaml"], "not both"),
        (["--column", "province"], "no column 'province'"),
        (["--split-file", "no-such-file.yaml"], "cannot read the split file"),
    ],
)
def test_cli_regions_bad_arguments_fail_clearly(sen12ms_index, tmp_path, arguments, message):
    out = tmp_path / "bad.parquet"
    result = runner.invoke(app, ["regions", str(sen12ms_index), *arguments, "--out", str(out)])
    assert result.exit_code != 0
    assert message in flat(result.output)
    assert "Traceback" not in result.output
    assert not out.exists()
