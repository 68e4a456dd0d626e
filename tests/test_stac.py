"""The STAC Item beside every map (`MAP.stac.json`) and `landcover catalog`.

Real `adapt` (the per-pixel classifier, quick) and `predict` (an untrained tiny run: what it
maps does not matter here) on the generated scene, through the CLI and through the flows.

Validation is offline: the STAC core schemas (Item and Catalog, v1.1.0, with the GeoJSON ones)
are the copies pystac ships (`pystac/validation/jsonschemas`), and the test refuses every
network connection while validating. The extensions' own JSON schemas (projection v2.0.0,
raster v1.1.0, classification v2.0.0) are not shipped by pystac, so their fields are checked
here one by one against the extensions' field definitions and the map itself.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pystac
import pytest
import rasterio
import shapely
from affine import Affine
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from rasterio.warp import transform, transform_bounds
from typer.testing import CliRunner

from geo.classes import DEEPGLOBE, DFC10, S2_BANDS
from geo.export import Grid, style_path, write_class_raster
from geo.sample_data import SceneFiles
from geo.stac import ASSET_KINDS, item_path, write_map_item
from models.backbones import arch_preset, build_model
from models.checkpoint import RunConfig, save_run
from pipeline.cli import app

runner = CliRunner()
EXTENSIONS = {
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/classification/v2.0.0/schema.json",
}
CLASS_NAME = re.compile(r"^[0-9A-Za-z_-]+$")
"""classification v2.0.0: a class's `name` is for machines; `title` is what a legend shows."""
COLOR_HINT = re.compile(r"^[0-9A-F]{6}$")
ALL_OPTIONAL = {
    "probabilities",
    "confidence",
    "confidence-style",
    "polygons",
    "report",
    "report-markdown",
    "suggestions",
}
EMPTY_ITEM: dict[str, Any] = {
    "type": "Feature",
    "stac_version": "1.1.0",
    "id": "x",
    "geometry": None,
    "properties": {},
    "links": [],
    "assets": {},
}


def invoke(*args: str | Path | int):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny U-Net run on the scene's bands: predict needs a run, not a good one."""
    arch = arch_preset("tiny", "segmentation", len(S2_BANDS), DFC10.num_classes)
    run = tmp_path_factory.mktemp("run")
    config = RunConfig(
        method="pretrain",
        task="segmentation",
        arch=arch,
        class_names=DFC10.names,
        class_colors=DFC10.colors,
        bands=tuple(S2_BANDS),
        normalisation={"clip": [0, 10000], "divide": 10000},
        seed=0,
        finetune_steps=1,
        finetune_lr=0.01,
    )
    save_run(run, build_model(arch, seed=0), config)
    return run


@dataclass(frozen=True)
class Maps:
    folder: Path
    adapted: Path
    """`adapt --model pixel` with probabilities, confidence, polygons and suggestions (and so its reports)."""
    predicted: Path
    """`predict` with the tiny run into a subfolder, no optional output."""


@pytest.fixture(scope="module")
def maps(tiny_run: Path, scene_files: SceneFiles, tmp_path_factory: pytest.TempPathFactory) -> Maps:
    folder = tmp_path_factory.mktemp("maps")
    made = Maps(folder, folder / "map.tif", folder / "scenes" / "other.tif")
    adapted = invoke(
        "adapt",
        "--model",
        "pixel",
        "--image",
        scene_files.image,
        "--labels",
        scene_files.labels,
        "--out",
        made.adapted,
        "--probabilities",
        folder / "probabilities.tif",
        "--confidence",
        folder / "confidence.tif",
        "--vector",
        folder / "map.gpkg",
        "--suggest",
        3,
        "--suggest-out",
        folder / "next.gpkg",
        "--device",
        "cpu",
    )
    assert adapted.exit_code == 0, adapted.output
    assert f"STAC item: {item_path(made.adapted)}" in adapted.output
    assert f"confidence: {folder / 'confidence.tif'} (style {folder / 'confidence.qml'})" in adapted.output
    predicted = invoke(
        "predict", "--model", tiny_run, "--image", scene_files.image, "--out", made.predicted, "--device", "cpu"
    )
    assert predicted.exit_code == 0, predicted.output
    return made


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any network connection fails the test: validation must use local schemas only."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def href(asset: pystac.Asset) -> Path:
    """Where an asset's href (relative to its item) leads."""
    absolute = asset.get_absolute_href()
    assert absolute is not None
    return Path(absolute)


def validate_core(content: dict, kind: pystac.STACObjectType) -> None:
    """Against the core schema of the document's STAC version, from pystac's local copies."""
    JsonSchemaSTACValidator().validate_core(content, kind, content["stac_version"])


# --- the item -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("offline")
def test_every_item_validates_against_the_stac_core_schemas_offline(maps: Maps):
    for map_path in (maps.adapted, maps.predicted):
        content = read(item_path(map_path))
        assert content["type"] == "Feature" and content["stac_version"] == "1.1.0"
        validate_core(content, pystac.STACObjectType.ITEM)
        assert set(content["stac_extensions"]) == EXTENSIONS


def test_projection_fields_are_the_maps_grid_and_the_bbox_holds_the_map(maps: Maps):
    for map_path in (maps.adapted, maps.predicted):
        item = read(item_path(map_path))
        with rasterio.open(map_path) as src:
            grid = src.crs, src.transform, src.height, src.width, src.bounds
        crs, affine, height, width, bounds = grid
        properties = item["properties"]
        assert properties["proj:code"] == f"EPSG:{crs.to_epsg()}"
        assert properties["proj:shape"] == [height, width]
        assert properties["proj:transform"] == list(affine)
        assert properties["proj:bbox"] == list(bounds)
        west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
        assert item["bbox"] == pytest.approx([west, south, east, north])
        footprint = shapely.geometry.shape(item["geometry"])
        assert footprint.is_valid and shapely.box(*item["bbox"]).buffer(1e-6).contains(footprint)
        left, bottom, right, top = bounds
        xs, ys = transform(crs, "EPSG:4326", [left, right, right, left], [bottom, bottom, top, top])
        vertices = sorted(shapely.get_coordinates(footprint)[:-1].tolist())
        corners = sorted([x, y] for x, y in zip(xs, ys))  # the footprint is the map's corners
        assert len(vertices) == 4 and all(v == pytest.approx(c, abs=1e-7) for v, c in zip(vertices, corners))


def test_the_map_asset_lists_the_schemes_classes_with_names_and_colours(maps: Maps):
    item = read(item_path(maps.adapted))
    asset = item["assets"]["map"]
    classes = asset["classification:classes"]
    assert [c["value"] for c in classes] == [*range(DFC10.num_classes), 255]
    assert [c["title"] for c in classes[:-1]] == list(DFC10.names)
    assert [c["color_hint"] for c in classes[:-1]] == [f"{r:02X}{g:02X}{b:02X}" for r, g, b in DFC10.colors]
    assert all(COLOR_HINT.match(c["color_hint"]) for c in classes[:-1])
    names = [c["name"] for c in classes]
    assert all(CLASS_NAME.match(name) for name in names) and len(set(names)) == len(names)
    assert names[6] == "urban-built-up" and classes[-1] == {
        "value": 255,
        "name": "nodata",
        "title": "No data",
        "nodata": True,
    }
    with rasterio.open(maps.adapted) as src:
        pixel = abs(src.transform.a)
    assert asset["raster:bands"] == [{"data_type": "uint8", "nodata": 255, "spatial_resolution": pixel}]
    probabilities = item["assets"]["probabilities"]["raster:bands"]
    assert probabilities == [{"data_type": "float32", "nodata": "nan", "spatial_resolution": pixel}] * DFC10.num_classes
    confidence = item["assets"]["confidence"]["raster:bands"]
    assert confidence == [{"data_type": "float32", "nodata": "nan", "spatial_resolution": pixel}]


def test_provenance_and_datetime_say_how_and_when(maps: Maps, tiny_run: Path, scene_files: SceneFiles, tmp_path: Path):
    adapted = read(item_path(maps.adapted))["properties"]
    assert adapted["landcover:method"] == "pixel" and "landcover:model" not in adapted
    assert adapted["landcover:scene"] == str(scene_files.image) and adapted["landcover:scheme"] == "dfc10"
    report = read(maps.adapted.with_name("map.report.json"))
    assert adapted["landcover:estimated_accuracy"] == report["chosen_estimate"]["accuracy"]
    assert adapted["datetime"] == adapted["created"]  # the generated scene has no TIFFTAG_DATETIME
    predicted = read(item_path(maps.predicted))["properties"]
    assert predicted["landcover:method"] == "pretrain" and predicted["landcover:model"] == str(tiny_run)

    scene = shutil.copy(scene_files.image, tmp_path / "dated.tif")
    with rasterio.open(scene, "r+") as src:
        src.update_tags(TIFFTAG_DATETIME="2021:07:14 10:30:05")
    copy = Path(shutil.copy(maps.adapted, tmp_path / "copy.tif"))
    written = read(write_map_item(copy, DFC10, scene=scene, assets={}, provenance={}))
    assert written["properties"]["datetime"] == "2021-07-14T10:30:05Z"
    assert set(written["assets"]) == {"map"}


@pytest.mark.usefixtures("offline")
def test_a_map_without_a_crs_gets_an_item_without_a_footprint(tmp_path: Path):
    """DeepGlobe's images carry no georeferencing: the map is in pixel coordinates, so the item
    has no geometry or bbox (null and absent, as STAC allows) and `proj:code` is null."""
    out = write_class_raster(
        np.zeros((8, 8), np.uint8), tmp_path / "map.tif", DEEPGLOBE, Grid(8, 8, None, Affine.identity())
    )
    content = read(write_map_item(out, DEEPGLOBE, scene=out, assets={"style": style_path(out)}, provenance={}))
    validate_core(content, pystac.STACObjectType.ITEM)
    assert content["geometry"] is None and "bbox" not in content
    assert content["properties"]["proj:code"] is None and content["properties"]["proj:shape"] == [8, 8]
    assert [c["title"] for c in content["assets"]["map"]["classification:classes"]] == [*DEEPGLOBE.names, "No data"]


def test_pystac_opens_the_item_with_the_map_asset_even_in_a_moved_folder(maps: Maps, tmp_path: Path):
    moved = Path(shutil.copytree(maps.folder, tmp_path / "moved"))
    for folder in (maps.folder, moved):
        item = pystac.Item.from_file(str(folder / "map.stac.json"))
        assert item.id == "map"
        asset = item.assets["map"]
        assert href(asset) == folder / "map.tif" and (folder / "map.tif").is_file()
        assert asset.media_type == pystac.MediaType.COG and asset.roles == ["data"]
        assert [c.title for c in ClassificationExtension.ext(asset).classes or []][:3] == list(DFC10.names[:3])
        assert ProjectionExtension.ext(item).code == read(folder / "map.stac.json")["properties"]["proj:code"]
        for role, other in item.assets.items():
            assert href(other).is_file(), role
            assert other.media_type == ASSET_KINDS[role].media_type


def test_optional_assets_are_listed_exactly_when_written(
    maps: Maps, tiny_run: Path, scene_files: SceneFiles, tmp_path: Path
):
    adapted = read(item_path(maps.adapted))["assets"]
    assert set(adapted) == {"map", "style", *ALL_OPTIONAL}
    assert {role: asset["href"] for role, asset in adapted.items()} == {
        "map": "./map.tif",
        "style": "./map.qml",
        "probabilities": "./probabilities.tif",
        "confidence": "./confidence.tif",
        "confidence-style": "./confidence.qml",
        "polygons": "./map.gpkg",
        "report": "./map.report.json",
        "report-markdown": "./map.report.md",
        "suggestions": "./next.gpkg",
    }
    assert set(read(item_path(maps.predicted))["assets"]) == {"map", "style"}

    # The adapted map rewritten by predict, without probabilities, polygons or a report: no stale asset.
    folder = Path(shutil.copytree(maps.folder, tmp_path / "rewritten"))
    result = invoke(
        "predict", "--model", tiny_run, "--image", scene_files.image, "--out", folder / "map.tif", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert set(read(folder / "map.stac.json")["assets"]) == {"map", "style"}
    assert (folder / "probabilities.tif").exists()  # an earlier run's file stays, but the item no longer lists it


# --- the catalog ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("offline")
def test_catalog_gathers_every_item_and_pystac_reads_them_all(maps: Maps, tmp_path: Path):
    result = invoke("catalog", maps.folder)
    assert result.exit_code == 0, result.output
    out = maps.folder / "catalog.json"
    assert f"wrote {out}: 2 STAC items" in result.output
    content = read(out)
    validate_core(content, pystac.STACObjectType.CATALOG)
    assert sorted(link["href"] for link in content["links"] if link["rel"] == "item") == [
        "./map.stac.json",
        "./scenes/other.stac.json",
    ]
    catalog = pystac.Catalog.from_file(str(out))
    items = sorted(catalog.get_items(recursive=True), key=lambda item: item.id)
    assert [item.id for item in items] == ["map", "other"]
    for item in items:
        assert href(item.assets["map"]).is_file()

    elsewhere = tmp_path / "stac" / "maps.json"
    titled = invoke("catalog", maps.folder, "--out", elsewhere, "--title", "Scene 0")
    assert titled.exit_code == 0, titled.output
    catalog = pystac.Catalog.from_file(str(elsewhere))
    assert catalog.title == "Scene 0" and len(list(catalog.get_items(recursive=True))) == 2


def _broken(folder: Path, text: str) -> Path:
    path = folder / "sub" / "broken.stac.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


BAD_FOLDERS = {
    "no item": (lambda folder: folder, "holds no STAC items"),
    "not JSON": (lambda folder: _broken(folder, '{"type": "Feature", '), "is not a STAC Item (invalid JSON"),
    "a catalog, not an item": (lambda folder: _broken(folder, '{"type": "Catalog"}'), 'no "type": "Feature"'),
    "an item without its fields": (
        lambda folder: _broken(folder, '{"type": "Feature", "id": "x"}'),
        "is not a STAC Item (no stac_version, geometry, properties, links, assets)",
    ),
    "an item with a broken field": (
        lambda folder: _broken(folder, json.dumps({**EMPTY_ITEM, "properties": {"datetime": "not a date"}})),
        "is not a STAC Item (",
    ),
    "not a folder": (lambda folder: folder / "missing", "is not a folder"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_is_one_error_line_naming_the_file_and_writes_nothing(case: str, tmp_path: Path):
    folder = tmp_path / "maps"
    folder.mkdir()
    make, words = BAD_FOLDERS[case]
    bad = make(folder)
    given = folder / "missing" if case == "not a folder" else folder
    result = invoke("catalog", given)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {bad}: ") and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not list(tmp_path.rglob("catalog.json")) and not list(tmp_path.rglob(".catalog.json*"))


# --- the flows ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_the_flows_adapt_and_predict_step_writes_the_items_confidence_and_suggestions(
    tiny_run: Path, scene_files: SceneFiles, tmp_path: Path
):
    from flows.flows import adapt_predict_flow

    out, other = tmp_path / "adapt" / "map.tif", tmp_path / "maps" / "scene.tif"
    settings = {"device": "cpu", "check": False, "pixel": False, "steps": 1}
    maps = adapt_predict_flow(
        tiny_run,
        scene_files.image,
        scene_files.labels,
        out,
        tmp_path / "adapt" / "model",
        settings,
        {scene_files.image: other},
        ("confidence",),
        {"count": 3, "out": tmp_path / "adapt" / "suggestions.gpkg", "spacing": 16},
    )
    assert maps == [out, other]
    for map_path in maps:
        item = pystac.Item.from_file(str(item_path(map_path)))
        assert href(item.assets["map"]) == map_path
        assert "classification:classes" in item.assets["map"].extra_fields
        assert href(item.assets["confidence"]) == map_path.with_name(f"{map_path.stem}.confidence.tif")
        assert href(item.assets["confidence"]).exists() and "probabilities" not in item.assets
    suggestions = pystac.Item.from_file(str(item_path(out))).assets["suggestions"]
    assert href(suggestions) == tmp_path / "adapt" / "suggestions.gpkg"
    assert len(gpd.read_file(href(suggestions))) == 3
    assert read(item_path(other))["properties"]["landcover:method"] == f"{tiny_run.name} fine-tuned"
