"""GIS-ready writers: a valid COG with colours and names, a QGIS style, polygons, atomic writes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Compression
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

from geo import export
from geo.classes import DFC10, ClassScheme
from geo.export import Grid, class_raster_writer, style_path, write_class_raster, write_polygons, write_qml

GRID = Grid(width=1100, height=900, crs=CRS.from_epsg(32633), transform=from_origin(500_000, 4_000_000, 10, 10))
ODD = ClassScheme("odd", ("Sand & <Gravel>", "Water"), ((200, 180, 10), (0, 0, 255)))


def blocky_classes(height: int, width: int) -> np.ndarray:
    """Three classes in bands of columns (edges at odd columns, so overviews must pick, not mix),
    nodata in the top-left corner."""
    classes = np.zeros((height, width), np.uint8)
    classes[:, width // 3 | 1 :] = 9
    classes[:, 2 * width // 3 | 1 :] = 6
    classes[: height // 4, : width // 5] = 255
    return classes


def test_class_raster_is_a_valid_cog_with_colours_names_and_the_grid(tmp_path: Path):
    classes = blocky_classes(GRID.height, GRID.width)
    path = write_class_raster(classes, tmp_path / "map.tif", DFC10, GRID)
    valid, errors, _ = cog_validate(str(path))
    assert valid, errors
    with rasterio.open(path) as src:
        assert (src.crs, src.transform, src.width, src.height) == (GRID.crs, GRID.transform, GRID.width, GRID.height)
        assert src.dtypes == ("uint8",) and src.nodata == 255
        assert src.block_shapes == [(export.COG_BLOCKSIZE, export.COG_BLOCKSIZE)]
        assert src.compression == Compression.deflate
        assert src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(1), classes)
        colormap = src.colormap(1)
        assert json.loads(src.tags()[export.CLASS_NAMES_TAG]) == list(DFC10.names)
        assert "dfc10" in src.descriptions[0]
    with rasterio.open(path, overview_level=0) as overview:
        np.testing.assert_array_equal(overview.read(1), classes[::2, ::2])  # nearest: picked, never mixed
    for class_id, color in enumerate(DFC10.colors):
        assert colormap[class_id] == (*color, 255)
    assert colormap[255][3] == 0  # nodata transparent
    assert style_path(path).exists()


def test_qml_has_one_palette_entry_per_class_and_escapes_names(tmp_path: Path):
    root = ET.parse(write_qml(tmp_path / "map.qml", ODD)).getroot()
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("label"), e.get("color"), e.get("alpha")) for e in entries] == [
        ("0", "Sand & <Gravel>", "#c8b40a", "255"),
        ("1", "Water", "#0000ff", "255"),
    ]


def test_polygons_carry_class_names_in_the_scene_crs_and_cover_the_pixels(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(export, "POLYGON_CHUNK", 2)  # exercise appending chunk after chunk
    grid = Grid(width=60, height=40, crs=GRID.crs, transform=GRID.transform)
    classes = blocky_classes(grid.height, grid.width)
    classes[30:35, 5:8] = 9  # an island of water inside forest: a polygon with a hole
    raster = write_class_raster(classes, tmp_path / "map.tif", DFC10, grid)
    frame = gpd.read_file(write_polygons(raster, tmp_path / "map.gpkg", DFC10), layer="classes")
    assert frame.crs == grid.crs
    assert set(frame.columns) >= {"class_id", "class_name", "geometry"}
    assert 255 not in set(frame["class_id"])
    assert all(frame["class_name"] == [DFC10.names[i] for i in frame["class_id"]])
    pixel_area = 10 * 10
    areas = frame.assign(area=frame.area).groupby("class_id")["area"].sum()
    for class_id in (0, 6, 9):
        assert areas[class_id] == pytest.approx((classes == class_id).sum() * pixel_area)
    left, bottom, right, top = frame.total_bounds
    assert (left, top) == (500_000, 4_000_000) and (right, bottom) == (500_600, 3_999_600)


def test_ungeoreferenced_map_and_polygons_use_pixel_coordinates(tmp_path: Path):
    grid = Grid(width=50, height=30, crs=None, transform=rasterio.Affine.identity())
    assert not grid.georeferenced
    classes = blocky_classes(grid.height, grid.width)
    raster = write_class_raster(classes, tmp_path / "map.tif", DFC10, grid)
    assert cog_validate(str(raster))[0]
    with rasterio.open(raster) as src:
        assert src.crs is None and src.transform == rasterio.Affine.identity()
    frame = gpd.read_file(write_polygons(raster, tmp_path / "map.gpkg", DFC10))
    assert frame.crs is None
    left, bottom, right, top = frame.total_bounds
    assert (left, bottom, right, top) == (0, -30, 50, 0)  # x = col, y = -row, as QGIS shows the raster
    water = frame[frame["class_id"] == 9]
    assert water.area.sum() == (classes == 9).sum()


def test_polygons_of_an_all_nodata_map_make_an_empty_layer(tmp_path: Path):
    grid = Grid(width=20, height=10, crs=GRID.crs, transform=GRID.transform)
    raster = write_class_raster(np.full((10, 20), 255, np.uint8), tmp_path / "map.tif", DFC10, grid)
    frame = gpd.read_file(write_polygons(raster, tmp_path / "map.gpkg", DFC10))
    assert len(frame) == 0 and {"class_id", "class_name"} <= set(frame.columns)


def test_a_failing_writer_leaves_nothing_behind(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), class_raster_writer(out / "map.tif", DFC10, GRID) as dst:
        dst.write(np.zeros((1, 100, GRID.width), np.uint8), window=((0, 100), (0, GRID.width)))
        raise RuntimeError("crash halfway")
    assert list(out.iterdir()) == []
