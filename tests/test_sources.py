"""Dataset layouts as their releases lay them out: DFC2020, DeepGlobe as torchgeo downloads it, a
team's own image/label pairs; bad inputs of each, named; the registry is the one list of sources."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from typer.testing import CliRunner

from geo.classes import DFC10, IGBP_TO_DFC10, IGNORE_INDEX
from geo.index import read_index
from geo.readers import load_tile
from geo.sample_data import write_geotiff, write_scene
from geo.sources import REGISTRY, SOURCE_NAMES, index_source, source_class
from geo.sources.base import Source
from pipeline.cli import app
from pipeline.ingest import ingest
from pipeline.regions import build_regions

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def error_line(stderr: str) -> str:
    """The one `error:` line, the last of stderr (progress lines may come before it)."""
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    return lines[-1]


def test_every_registered_source_is_one_class_named_as_registered() -> None:
    for name in SOURCE_NAMES:
        source = source_class(name)
        assert issubclass(source, Source) and source.name == name
        assert source.__doc__ and source.__module__ == REGISTRY[name].partition(":")[0]
        assert source.__module__.removeprefix("geo.sources.") + ".py" in {
            path.name for path in (Path(__file__).parents[1] / "geo" / "sources").iterdir()
        }


# --- DFC2020 ------------------------------------------------------------------------------------


def write_dfc2020(sen12ms_root: Path, out: Path, *, patches: int = 12) -> Path:
    """DFC2020 as released, from generated SEN12MS patches: `ROIs0000_test/{s2_0,dfc_0}` and
    `ROIs0000_validation/{s2_validation,dfc_validation}`, labels 1..10 (0 where IGBP has none)."""
    s2_files = sorted(sen12ms_root.glob("ROIs*/s2_*/*.tif"))[:patches]
    for number, s2 in enumerate(s2_files):
        part, folder = ("test", "0") if number % 3 else ("validation", "validation")
        lc = s2.parent.with_name("lc" + s2.parent.name.removeprefix("s2")) / s2.name.replace("_s2_", "_lc_")
        with rasterio.open(lc) as src:
            dfc = IGBP_TO_DFC10[src.read(1)].astype(np.uint16) + 1
            crs, transform = src.crs, src.transform
        dfc[dfc == IGNORE_INDEX + 1] = 0
        season = out / f"ROIs0000_{part}"
        (season / f"s2_{folder}").mkdir(parents=True, exist_ok=True)
        shutil.copy(s2, season / f"s2_{folder}" / f"ROIs0000_{part}_s2_0_p{number}.tif")
        write_geotiff(season / f"dfc_{folder}" / f"ROIs0000_{part}_dfc_0_p{number}.tif", dfc[None], crs, transform)
    return out


@pytest.fixture
def dfc2020_root(sen12ms_root: Path, tmp_path: Path) -> Path:
    return write_dfc2020(sen12ms_root, tmp_path / "dfc2020")


def test_dfc2020_labels_are_the_dfc_classes_and_unlabelled_pixels_are_ignored(
    dfc2020_root: Path, tmp_path: Path
) -> None:
    index = ingest("dfc2020", dfc2020_root, tmp_path / "dfc.parquet", progress=False).out
    frame, metadata = read_index(index)
    assert len(frame) == 12 and metadata["source"] == "dfc2020" and metadata["skipped"] == []
    assert metadata["scheme"]["names"] == list(DFC10.names) and len(metadata["bands"]) == 13
    assert set(frame["season"]) == {"ROIs0000_test", "ROIs0000_validation"} and set(frame["scene"]) == {"0"}
    source = index_source(metadata)
    for _, row in frame.iterrows():
        with rasterio.open(row["label_path"]) as src:
            values = src.read(1)
        mask = load_tile(row, source).mask
        assert np.array_equal(mask, np.where(values == 0, IGNORE_INDEX, values.astype(np.int64) - 1))
        assert list(row["class_counts"]) == np.bincount(values[values > 0] - 1, minlength=10).tolist()
    # the release drops the scene ids: regions need KMeans, and say so
    with pytest.raises(ValueError, match="--by kmeans"):
        source.regions(frame)
    summary = build_regions(index, tmp_path / "regions.parquet", by="kmeans", k=3, split=(0.34, 0.33, 0.33))
    assert sum(summary.regions_per_split.values()) == 3  # no scene id ties every region to one split


def test_dfc2020_label_values_outside_the_classes_are_named(dfc2020_root: Path, tmp_path: Path) -> None:
    label = sorted(dfc2020_root.glob("ROIs0000_test/dfc_0/*.tif"))[0]
    with rasterio.open(label) as src:
        values, crs, transform = src.read(), src.crs, src.transform
    values[0, :2, :2] = 11
    write_geotiff(label, values, crs, transform)
    result = runner.invoke(
        app, ["ingest", str(dfc2020_root), "--source", "dfc2020", "--out", str(tmp_path / "i.parquet")]
    )
    assert result.exit_code == 0
    assert f"skipped {label}: holds label value(s) 11; DFC2020 labels are 1..10" in flat(result.stderr)
    strict = runner.invoke(
        app, ["ingest", str(dfc2020_root), "--source", "dfc2020", "--strict", "--out", str(tmp_path / "s.parquet")]
    )
    assert strict.exit_code == 1 and error_line(strict.stderr).startswith(f"error: {label}: holds label value(s) 11")
    assert not (tmp_path / "s.parquet").exists()


# --- DeepGlobe as torchgeo lays it out ----------------------------------------------------------


def test_torchgeo_deepglobe_layout_gives_the_release_layouts_index(deepglobe_root: Path, tmp_path: Path) -> None:
    torchgeo = tmp_path / "data" / "training_data"
    (torchgeo / "images").mkdir(parents=True)
    (torchgeo / "masks").mkdir()
    for sat in deepglobe_root.glob("*_sat.jpg"):
        shutil.copy(sat, torchgeo / "images" / sat.name)
        mask = sat.name.replace("_sat.jpg", "_mask.png")
        shutil.copy(deepglobe_root / mask, torchgeo / "masks" / mask)
    release, _ = read_index(ingest("deepglobe", deepglobe_root, tmp_path / "release.parquet", progress=False).out)
    moved, metadata = read_index(
        ingest("deepglobe", tmp_path / "data", tmp_path / "torchgeo.parquet", progress=False).out
    )
    assert metadata["skipped"] == [] and len(moved) == len(release) == 12 * 16
    assert [Path(p).name for p in moved["path"]] == [Path(p).name for p in release["path"]]
    assert all(Path(p).parent.name == "masks" for p in moved["label_path"])
    others = [column for column in release.columns if column not in ("path", "label_path")]
    assert moved[others].equals(release[others])
    missing = torchgeo / "masks" / Path(moved["label_path"].iloc[0]).name
    missing.unlink()
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "data"), "--source", "deepglobe", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 0 and f"(expected {missing})" in flat(result.stderr)


# --- a team's own image/label pairs -------------------------------------------------------------


class ClassEntry(TypedDict):
    """One class of a pairs classes file: its label value, name and colour (hex or RGB)."""

    value: int
    name: str
    color: str | list[int]


class ClassesFile(TypedDict):
    classes: list[ClassEntry]
    ignore: list[int]


WORLDCOVER: ClassesFile = {
    "classes": [
        {"value": 10, "name": "Tree cover", "color": "#006400"},
        {"value": 20, "name": "Shrubland", "color": [255, 187, 34]},
        {"value": 30, "name": "Grassland", "color": "#ffff4c"},
        {"value": 40, "name": "Cropland", "color": "#f096ff"},
        {"value": 50, "name": "Built-up", "color": "#fa0000"},
        {"value": 60, "name": "Bare", "color": "#b4b4b4"},
        {"value": 70, "name": "Snow and ice", "color": "#f0f0f0"},
        {"value": 80, "name": "Water", "color": "#0064c8"},
        {"value": 90, "name": "Wetland", "color": "#0096a0"},
        {"value": 95, "name": "Mangroves", "color": "#00cf75"},
    ],
    "ignore": [0],
}
"""ESA WorldCover's values and colours (10 classes of the 11; 100 Moss and lichen left out)."""


def write_pairs(out: Path, seeds: tuple[int, ...] = (0, 1)) -> Path:
    """`images/<name>.tif` scenes with `labels/<name>.tif` on their grid (generated truth as
    WorldCover-style values: class id k -> 10 (k + 1), 95 for the last; nodata -> 0)."""
    values = np.array([entry["value"] for entry in WORLDCOVER["classes"]] + [0] * 246, dtype=np.uint8)
    for seed in seeds:
        scene = write_scene(out / "work" / str(seed), seed=seed, size=64)
        (out / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(scene.image, out / "images" / f"scene{seed}.tif")
        with rasterio.open(scene.truth) as src:
            write_geotiff(out / "labels" / f"scene{seed}.tif", values[src.read()], src.crs, src.transform)
    shutil.rmtree(out / "work")
    (out / "classes.yaml").write_text(yaml.safe_dump(WORLDCOVER))
    return out


@pytest.fixture
def pairs_root(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs")


def test_pairs_are_read_with_the_classes_file_and_need_it_no_more(pairs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pairs.parquet"
    command = ["ingest", str(pairs_root), "--source", "pairs", "--classes", str(pairs_root / "classes.yaml")]
    result = runner.invoke(app, [*command, "--grid", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame, metadata = read_index(out)
    assert len(frame) == 2 * 4 and metadata["skipped"] == [] and metadata["grid"] == 2
    assert metadata["scheme"]["names"] == [entry["name"] for entry in WORLDCOVER["classes"]]
    assert metadata["scheme"]["colors"][0] == [0, 100, 0] and metadata["scheme"]["colors"][1] == [255, 187, 34]
    (pairs_root / "classes.yaml").unlink()  # the index holds the classes
    source = index_source(metadata)
    for _, row in frame.iterrows():
        with rasterio.open(row["label_path"]) as src:
            window = rasterio.windows.Window(row["col_off"], row["row_off"], row["width"], row["height"])
            values = src.read(1, window=window)
        mask = load_tile(row, source).mask
        class_of = {entry["value"]: k for k, entry in enumerate(WORLDCOVER["classes"])} | {0: IGNORE_INDEX}
        assert np.array_equal(mask, np.vectorize(class_of.get)(values))
    regions = build_regions(out, tmp_path / "regions.parquet", split=(0.5, 0.5, 0.0))
    assert sum(regions.regions_per_split.values()) == 2  # one region per image


@pytest.mark.parametrize(
    "break_it, named, problem",
    [
        (
            lambda root: _shift_grid(root / "labels" / "scene1.tif"),
            "labels/scene1.tif",
            "lies on another grid than its image scene1.tif",
        ),
        (
            lambda root: _write_value(root / "labels" / "scene1.tif", 100),
            "labels/scene1.tif",
            "holds label value(s) 100 that are neither a class nor ignored",
        ),
        (lambda root: (root / "labels" / "scene1.tif").unlink(), "images/scene1.tif", "has no label raster (expected"),
        (lambda root: (root / "images" / "scene1.tif").unlink(), "labels/scene1.tif", "has no image (expected"),
    ],
    ids=["other grid", "unknown value", "image alone", "label alone"],
)
def test_bad_pairs_are_skipped_or_fatal_with_the_file_named(
    pairs_root: Path, tmp_path: Path, break_it, named, problem
) -> None:
    break_it(pairs_root)
    command = ["ingest", str(pairs_root), "--source", "pairs", "--classes", str(pairs_root / "classes.yaml")]
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "i.parquet")])
    assert result.exit_code == 0 and f"skipped {pairs_root / named}: {problem}" in flat(result.stderr)
    assert [Path(p).name for p in read_index(tmp_path / "i.parquet")[0]["path"].unique()] == ["scene0.tif"]
    strict = runner.invoke(app, [*command, "--strict", "--out", str(tmp_path / "s.parquet")])
    assert strict.exit_code == 1 and error_line(strict.stderr).startswith(f"error: {pairs_root / named}: {problem}")
    assert not (tmp_path / "s.parquet").exists()


def _shift_grid(path: Path) -> None:
    with rasterio.open(path) as src:
        values, crs, transform = src.read(), src.crs, src.transform
    write_geotiff(path, values, crs, transform @ Affine.translation(1, 0))


def _write_value(path: Path, value: int) -> None:
    with rasterio.open(path) as src:
        values, crs, transform = src.read(), src.crs, src.transform
    values[0, 5, 5] = value
    write_geotiff(path, values, crs, transform)


@pytest.mark.parametrize(
    "classes, problem",
    [
        ({**WORLDCOVER, "colour": 1}, "unknown key 'colour'; known keys: classes, ignore"),
        (
            {"classes": [{"value": 1, "name": "a", "color": "#12345"}, {"value": 2, "name": "b", "color": "#000000"}]},
            "classes[0].color: colour '#12345' is not #rrggbb or [r, g, b]",
        ),
        (
            {"classes": [{"value": 1, "name": "a", "color": [0, 0, 0]}, {"value": 1, "name": "b", "color": [1, 1, 1]}]},
            "label value(s) 1 name more than one class",
        ),
        (
            {"classes": [{"value": 1, "name": "a", "color": [0, 0, 0]}, {"value": 2, "name": " ", "color": [1, 1, 1]}]},
            "classes[1].name: is blank",
        ),
        (
            {
                "classes": [
                    {"value": 1, "name": "a", "color": [0, 0, 0]},
                    {"value": 2, "name": "b", "color": [1, 1, 1]},
                ],
                "ignore": 2,
            },
            "label value(s) 2 are both a class and ignored",
        ),
        (
            {
                "classes": [
                    {"value": 1, "name": "a", "color": [0, 0, 300]},
                    {"value": 2, "name": "b", "color": [1, 1, 1]},
                ]
            },
            "classes[0].color: colour [0, 0, 300] has a channel outside 0..255",
        ),
        ("just text", "expected a mapping, got 'just text'"),
    ],
    ids=["unknown key", "bad hex", "value twice", "blank name", "class ignored", "channel range", "not a mapping"],
)
def test_a_bad_classes_file_is_named_with_its_key(pairs_root: Path, tmp_path: Path, classes, problem) -> None:
    (pairs_root / "classes.yaml").write_text(yaml.safe_dump(classes))
    result = runner.invoke(
        app,
        [
            "ingest",
            str(pairs_root),
            "--source",
            "pairs",
            "--classes",
            str(pairs_root / "classes.yaml"),
            "--out",
            str(tmp_path / "i"),
        ],
    )
    assert result.exit_code == 1 and error_line(result.stderr).startswith(f"error: {pairs_root / 'classes.yaml'}: ")
    assert problem in flat(result.stderr) and not (tmp_path / "i").exists()


def test_classes_are_asked_for_by_pairs_and_refused_elsewhere(
    pairs_root: Path, sen12ms_root: Path, tmp_path: Path
) -> None:
    without = runner.invoke(app, ["ingest", str(pairs_root), "--source", "pairs", "--out", str(tmp_path / "i")])
    assert without.exit_code == 2 and "the pairs source needs a classes file" in flat(without.output)
    extra = ["--classes", str(pairs_root / "classes.yaml"), "--out", str(tmp_path / "j")]
    refused = runner.invoke(app, ["ingest", str(sen12ms_root), "--source", "sen12ms", *extra])
    assert refused.exit_code == 2 and "--classes does not apply to the sen12ms source" in flat(refused.output)
    assert not (tmp_path / "i").exists() and not (tmp_path / "j").exists()
