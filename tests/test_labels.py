"""Reading a user's labels: any CRS and format, names or ids, points or polygons; clear errors."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin, xy
from rasterio.windows import Window
from shapely.geometry import Point, box

from geo.classes import DFC10
from geo.errors import DataError
from geo.labels import read_labels
from geo.sample_data import write_geotiff

UTM = CRS.from_epsg(32633)
TRANSFORM = from_origin(500_000, 4_000_000, 10, 10)
HEIGHT, WIDTH = 100, 120


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    return write_geotiff(tmp_path / "scene.tif", np.ones((2, HEIGHT, WIDTH), np.uint16), UTM, TRANSFORM)


def centres(pixels: list[tuple[int, int]]) -> list[Point]:
    return [Point(*xy(TRANSFORM, row, col)) for row, col in pixels]


def pixel_box(top: int, left: int, bottom: int, right: int):
    """Polygon whose edges lie on pixel edges: rows top..bottom-1, cols left..right-1."""
    (x0, y0), (x1, y1) = TRANSFORM @ (left, top), TRANSFORM @ (right, bottom)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def write(frame: gpd.GeoDataFrame, path: Path, driver: str) -> Path:
    frame.to_file(path, driver=driver)
    return path


def as_set(labels) -> set[tuple[int, int, int]]:
    return set(zip(labels.rows.tolist(), labels.cols.tolist(), labels.class_ids.tolist()))


def test_points_in_another_crs_with_names_in_any_case(scene: Path, tmp_path: Path):
    pixels = [(5, 7), (50, 60), (99, 119)]
    frame = gpd.GeoDataFrame({"class": ["forest", "WATER", " Urban/Built-up "]}, geometry=centres(pixels), crs=UTM)
    path = write(frame.to_crs("EPSG:4326"), tmp_path / "labels.geojson", "GeoJSON")
    labels = read_labels(path, scene, DFC10)
    assert as_set(labels) == {(5, 7, 0), (50, 60, 9), (99, 119, 6)}
    assert labels.rows.dtype == np.int64 and len(labels) == 3


def test_polygons_cover_the_pixels_whose_centres_they_hold(scene: Path, tmp_path: Path):
    polygons = [pixel_box(10, 20, 20, 30), pixel_box(60, 0, 62, 5)]
    frame = gpd.GeoDataFrame({"class": [3, 9]}, geometry=polygons, crs=UTM).to_crs("EPSG:3857")
    labels = read_labels(write(frame, tmp_path / "labels.gpkg", "GPKG"), scene, DFC10)
    first = {(r, c, 3) for r in range(10, 20) for c in range(20, 30)}
    second = {(r, c, 9) for r in (60, 61) for c in range(5)}
    assert as_set(labels) == first | second


def test_shapefile_of_ids_a_tiny_polygon_and_conflicting_overlaps(scene: Path, tmp_path: Path):
    tiny = Point(*xy(TRANSFORM, 40, 40)).buffer(1.0)  # 2 m across: covers no pixel centre
    geometries = [
        tiny,
        pixel_box(0, 0, 2, 2),
        pixel_box(1, 1, 3, 3),  # overlap in pixel (1, 1) with different classes
        pixel_box(80, 80, 81, 82),
        pixel_box(80, 80, 81, 81),  # overlap with the same class
    ]
    frame = gpd.GeoDataFrame({"label": [1, 2, 5, 4, 4]}, geometry=geometries, crs=UTM)
    labels = read_labels(write(frame, tmp_path / "labels.shp", "ESRI Shapefile"), scene, DFC10, class_column="label")
    assert (40, 40, 1) in as_set(labels)
    assert labels.conflicting == 1  # pixel (1, 1) is both class 2 and class 5: dropped
    assert not {(1, 1, 2), (1, 1, 5)} & as_set(labels)
    assert {(0, 0, 2), (2, 2, 5), (80, 80, 4), (80, 81, 4)} <= as_set(labels)
    assert len(labels) == 1 + 3 + 3 + 2
    raster = labels.raster()
    assert raster.shape == (HEIGHT, WIDTH) and raster.dtype == np.uint8
    assert raster[40, 40] == 1 and raster[1, 1] == 255 and (raster != 255).sum() == len(labels)
    np.testing.assert_array_equal(labels.raster(Window(80, 79, 3, 2)), [[255, 255, 255], [4, 4, 255]])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning", "ignore:'crs' was not provided")
def test_scene_without_crs_takes_labels_in_pixel_coordinates(tmp_path: Path):
    scene = write_geotiff(tmp_path / "image.tif", np.ones((3, 30, 40), np.uint8), None, rasterio.Affine.identity())
    frame = gpd.GeoDataFrame({"class": ["barren"]}, geometry=[Point(12.5, -7.5)])  # col 12, row 7 as QGIS shows it
    labels = read_labels(write(frame, tmp_path / "labels.gpkg", "GPKG"), scene, DFC10)
    assert as_set(labels) == {(7, 12, 8)}


def _points(classes: list, pixels: list[tuple[int, int]], column: str = "class") -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({column: classes}, geometry=centres(pixels), crs=UTM)


@pytest.mark.parametrize(
    "frame, message",
    [
        (_points(["forest"], [(1, 1)], column="landcover"), r"no class column 'class'; its columns: landcover"),
        (
            _points(["Forest", "Lava", "Moon"], [(1, 1)] * 3),
            r"unknown class name\(s\).*Lava, Moon.*valid classes of dfc10: Forest, Shrubland",
        ),
        (_points([0, 10, -1], [(1, 1)] * 3), r"class ids \[-1, 10\].*out of range.*0-9"),
        (_points([1.5], [(1, 1)]), r"non-integer class ids"),
        (_points(["water", "water", "water"], [(1, 1), (-5, 3), (HEIGHT, 3)]), r"2 of 3 labels fall outside the scene"),
        (_points(["water"], [(1, 1)]).iloc[:0], r"no labelled features"),
    ],
    ids=["missing-column", "unknown-names", "ids-out-of-range", "fractional-ids", "outside", "empty"],
)
def test_label_problems_raise_data_errors_naming_the_file(scene: Path, tmp_path: Path, frame, message: str):
    path = write(frame, tmp_path / "labels.gpkg", "GPKG")
    with pytest.raises(DataError, match=message) as raised:
        read_labels(path, scene, DFC10)
    assert raised.value.path == str(path)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_unreadable_labels_and_crs_mismatch_raise_data_errors(scene: Path, tmp_path: Path):
    broken = tmp_path / "broken.gpkg"
    broken.write_bytes(b"this is not a geopackage")
    with pytest.raises(DataError, match="cannot read the labels file") as raised:
        read_labels(broken, scene, DFC10)
    assert raised.value.path == str(broken)

    plain = write_geotiff(tmp_path / "image.tif", np.ones((3, 30, 40), np.uint8), None, rasterio.Affine.identity())
    labelled = write(_points(["water"], [(1, 1)]), tmp_path / "labels.gpkg", "GPKG")
    with pytest.raises(DataError, match=r"labels are in EPSG:32633 but the scene .*image.tif has no CRS"):
        read_labels(labelled, plain, DFC10)
