"""`adapt --suggest`: where one more label would help most, as a point layer to fill in QGIS.

The summary of the map's confidence (`geo.suggest.ConfidenceCells`) against a brute force over
the whole array, the pick's rules (spacing, labels, nodata, every class), and `landcover adapt
--suggest` end to end on the generated scene: the layer's CRS, count, spacing and columns, the
merged layer accepted by the next `adapt`, and the bad inputs. Whether suggested points teach
the map more than random ones is a race measured in `benchmarks/labelling_loop.py`.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
from affine import Affine
from pyproj import CRS
from typer.testing import CliRunner

from geo.classes import DFC10, IGNORE_INDEX
from geo.export import Grid
from geo.sample_data import SceneFiles
from geo.suggest import (
    MAX_CELLS,
    SUGGESTION_LAYER,
    ConfidenceCells,
    cell_size,
    centre_values,
    pick_suggestions,
)
from pipeline.cli import app

runner = CliRunner()
SPACING = 16


def invoke(*args: str | Path | int):
    return runner.invoke(app, [str(arg) for arg in args])


def synthetic(seed: int, height: int = 70, width: int = 53) -> tuple[Grid, np.ndarray, np.ndarray]:
    """A grid, a confidence array with a NaN (nodata) corner and class ids (255 there)."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.2, 1.0, (height, width)).astype(np.float32)
    classes = rng.integers(0, 4, (height, width)).astype(np.uint8)
    rows, cols = np.mgrid[:height, :width]
    nodata = rows + cols < 20
    confidence[nodata] = np.nan
    classes[nodata] = IGNORE_INDEX
    return Grid(width, height, CRS.from_epsg(32631), Affine(10, 0, 500000, 0, -10, 6000000)), confidence, classes


@pytest.mark.parametrize("strip", [1, 7, 16, 70])
def test_cells_filled_strip_by_strip_match_a_brute_force(strip: int):
    grid, confidence, classes = synthetic(0)
    cells = ConfidenceCells(grid, 8)
    for top in range(0, grid.height, strip):
        cells.add(top, confidence[top : top + strip], classes[top : top + strip])
    assert cells.shape == (9, 7)
    for cell_row in range(9):
        for cell_col in range(7):
            block = confidence[cell_row * 8 : cell_row * 8 + 8, cell_col * 8 : cell_col * 8 + 8]
            data = ~np.isnan(block)
            assert cells.count[cell_row, cell_col] == data.sum()
            assert cells.total[cell_row, cell_col] == pytest.approx(float(block[data].sum(dtype=np.float64)))
            row, col = min(cell_row * 8 + 4, 69), min(cell_col * 8 + 4, 52)  # the last cells' centres stay inside
            assert (cells.centre_rows[cell_row], cells.centre_cols[cell_col]) == (row, col)
            np.testing.assert_array_equal(cells.centre_confidence[cell_row, cell_col], confidence[row, col])
            assert cells.centre_class[cell_row, cell_col] == classes[row, col]
    ranked = np.isfinite(cells.mean())  # cells mostly nodata, or cut by the scene's edge, are not candidates
    np.testing.assert_array_equal(ranked, cells.count >= 32)
    assert not ranked[0, 0] and not ranked[-1, -1] and ranked[3, 3]
    np.testing.assert_allclose(cells.mean()[ranked], (cells.total / cells.count)[ranked])


def test_centre_values_are_the_bands_at_the_cells_centres_and_nan_on_nodata(scene_files: SceneFiles):
    with rasterio.open(scene_files.image) as src:
        grid, pixels, mask = Grid.of(src), src.read(), src.dataset_mask() > 0
    cells = ConfidenceCells(grid, 12)
    values = centre_values(scene_files.image, [4, 3, 2], cells)
    rows, cols = np.meshgrid(cells.centre_rows, cells.centre_cols, indexing="ij")
    on_data = mask[rows, cols]
    assert values.shape == (*cells.shape, 3) and not on_data.all() and on_data.any()
    np.testing.assert_array_equal(values[on_data], pixels[[3, 2, 1]][:, rows, cols].transpose(1, 2, 0)[on_data])
    assert np.isnan(values[~on_data]).all()


def three_kinds(confidences: tuple[float, float, float]) -> tuple[ConfidenceCells, np.ndarray]:
    """A 64 x 96 scene of 8 px cells in three bands of 32 columns, three kinds of ground (band
    values 0, 100 and 200, with a little noise), each mapped as class 0, 1, 2 with the confidence
    given for it."""
    kinds = np.repeat(np.arange(3), 32)[None].repeat(64, axis=0)
    cells = ConfidenceCells(Grid(96, 64, None, Affine.identity()), 8)
    cells.add(0, np.asarray(confidences, np.float32)[kinds], kinds.astype(np.uint8))
    values = 100.0 * kinds[cells.centre_rows][:, cells.centre_cols][..., None]
    return cells, values + np.random.default_rng(0).normal(0, 1, values.shape)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_points_go_to_the_kind_of_ground_with_the_most_doubt_for_its_points(order: tuple[int, int, int]):
    """Doubts 0.6, 0.4 and 0.1 per cell over equal areas: the most doubted kind gets the first point;
    with one point its doubt per point (0.3) is below the second's (0.4), which gets the next; then
    the first again (0.3 against 0.2 and 0.1)."""
    confidences = np.empty(3)
    confidences[list(order)] = [0.4, 0.6, 0.9]
    cells, values = three_kinds((confidences[0], confidences[1], confidences[2]))
    found = pick_suggestions(cells, values, np.array([], int), np.array([], int), count=3, spacing=8)
    assert found.class_ids.tolist() == [order[0], order[1], order[0]]
    assert (found.cols // 32).tolist() == found.class_ids.tolist()  # each point on the ground of its kind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_picks_are_spaced_apart_away_from_labels_on_data_and_at_cell_centres(seed: int):
    grid, confidence, classes = synthetic(seed)
    cells = ConfidenceCells(grid, 4)
    cells.add(0, confidence, classes)
    values = np.random.default_rng(seed).normal(size=(*cells.shape, 3))
    labelled_rows, labelled_cols = np.array([40, 60]), np.array([10, 45])
    found = pick_suggestions(cells, values, labelled_rows, labelled_cols, count=6, spacing=12)
    assert len(found) == 6 and found.asked == 6
    points = np.column_stack([found.rows, found.cols]).astype(float)
    between = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1))
    assert between[~np.eye(6, dtype=bool)].min() >= 12
    labels = np.column_stack([labelled_rows, labelled_cols])
    assert np.hypot(*(points[:, None] - labels[None]).transpose(2, 0, 1)).min() >= 12
    assert np.isfinite(confidence[found.rows, found.cols]).all()  # never on nodata
    assert set(found.rows.tolist()) <= set(cells.centre_rows.tolist())
    assert set(found.cols.tolist()) <= set(cells.centre_cols.tolist())
    np.testing.assert_array_equal(found.confidence, confidence[found.rows, found.cols])
    np.testing.assert_array_equal(found.class_ids, classes[found.rows, found.cols])
    again = pick_suggestions(cells, values, labelled_rows, labelled_cols, count=6, spacing=12)
    np.testing.assert_array_equal(again.rows, found.rows)  # the same summary gives the same points
    np.testing.assert_array_equal(again.cols, found.cols)


def test_a_spacing_too_large_for_the_scene_gives_the_points_that_fit():
    grid, confidence, classes = synthetic(0)
    cells = ConfidenceCells(grid, 4)
    cells.add(0, confidence, classes)
    values = np.random.default_rng(0).normal(size=(*cells.shape, 3))
    found = pick_suggestions(cells, values, np.array([60]), np.array([45]), count=5, spacing=40)
    assert found.asked == 5 and 0 < len(found) < 5
    assert np.hypot(found.rows - 60, found.cols - 45).min() >= 40


def test_cells_are_half_the_spacing_and_grow_to_keep_a_huge_scene_within_the_cell_budget():
    small = Grid(64, 64, None, Affine.identity())
    assert (cell_size(small, 24), cell_size(small, 25), cell_size(small, 0)) == (12, 12, 1)
    huge = Grid(200_000, 100_000, None, Affine.identity())
    size = cell_size(huge, 24)
    assert size > 12 and np.ceil(huge.height / size) * np.ceil(huge.width / size) <= MAX_CELLS * 1.01


# --- adapt --suggest, end to end ------------------------------------------------------------------


def adapt_pixel(scene: SceneFiles, labels: Path, out: Path, *more: str | Path | int):
    """`landcover adapt` with the per-pixel classifier alone (no trained run needed), unchecked."""
    return invoke(
        "adapt", "--model", "pixel", "--image", scene.image, "--labels", labels, "--out", out, "--no-check", *more
    )


def suggest(count: int, out: Path, spacing: int) -> list[str | Path | int]:
    """The `adapt` options asking for `count` points `spacing` px apart, written to `out`."""
    return ["--suggest", count, "--suggest-out", out, "--suggest-spacing", spacing]


def scene_pixels(points: gpd.GeoDataFrame, image: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the scene pixels under `points`."""
    with rasterio.open(image) as src:
        local = points.to_crs(src.crs)
        cols, rows = (~src.transform) * (local.geometry.x.to_numpy(), local.geometry.y.to_numpy())
    return np.floor(rows).astype(int), np.floor(cols).astype(int)


def read_band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.fixture(scope="module")
def suggested(scene_files: SceneFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `adapt --suggest 5` outputs: map.tif, confidence.tif and next.gpkg."""
    folder = tmp_path_factory.mktemp("suggested")
    result = adapt_pixel(
        scene_files,
        scene_files.labels,
        folder / "map.tif",
        "--confidence",
        folder / "confidence.tif",
        *suggest(5, folder / "next.gpkg", SPACING),
    )
    assert result.exit_code == 0, result.output
    assert f"suggested 5 points to label next: {folder / 'next.gpkg'}" in result.output
    return folder


def test_suggestions_are_a_point_layer_in_the_labels_crs_with_the_map_and_an_empty_class_to_fill(
    suggested: Path, scene_files: SceneFiles
):
    assert [name for name, _ in pyogrio.list_layers(suggested / "next.gpkg")] == [SUGGESTION_LAYER]
    points = gpd.read_file(suggested / "next.gpkg")
    labels = gpd.read_file(scene_files.labels)
    assert points.crs == labels.crs and points.crs != read_crs(scene_files.image)  # EPSG:4326, not the scene's UTM
    assert len(points) == 5 and set(points.geom_type) == {"Point"}
    assert points["suggestion"].tolist() == [1, 2, 3, 4, 5]
    assert points["class"].isna().all()  # named like the labels' column, for the user to fill in
    rows, cols = scene_pixels(points, scene_files.image)
    class_map, confidence = read_band(suggested / "map.tif"), read_band(suggested / "confidence.tif")
    assert points["predicted"].tolist() == [DFC10.names[class_id] for class_id in class_map[rows, cols]]
    np.testing.assert_allclose(points["confidence"], confidence[rows, cols], atol=1e-4)


def test_suggestions_are_spaced_on_data_and_away_from_every_label(suggested: Path, scene_files: SceneFiles):
    rows, cols = scene_pixels(gpd.read_file(suggested / "next.gpkg"), scene_files.image)
    assert (read_band(scene_files.truth)[rows, cols] != IGNORE_INDEX).all()  # never on nodata
    between = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])
    assert between[~np.eye(len(rows), dtype=bool)].min() >= SPACING
    label_rows, label_cols = scene_pixels(gpd.read_file(scene_files.labels), scene_files.image)
    assert np.hypot(rows[:, None] - label_rows[None], cols[:, None] - label_cols[None]).min() >= SPACING


def read_crs(image: Path) -> CRS:
    with rasterio.open(image) as src:
        return CRS.from_user_input(src.crs)


def test_the_filled_suggestions_merged_into_the_labels_are_accepted_by_the_next_adapt(
    scene_files: SceneFiles, tmp_path: Path
):
    """The loop, as a user runs it: labels in a column of their own name and in Web Mercator;
    the suggestions come back in that CRS with that column, filled (here from the truth) and
    appended to the labels, and the next round adapts on all of them and suggests elsewhere."""
    labels = gpd.read_file(scene_files.labels).rename(columns={"class": "landcover"}).to_crs(3857)
    labels.to_file(tmp_path / "labels.gpkg", driver="GPKG", engine="pyogrio")
    first = adapt_pixel(
        scene_files,
        tmp_path / "labels.gpkg",
        tmp_path / "map1.tif",
        "--class-column",
        "landcover",
        *suggest(5, tmp_path / "next1.gpkg", SPACING),
    )
    assert first.exit_code == 0, first.output
    assert f"adapted on {len(labels)} labelled pixels" in first.output
    filled = gpd.read_file(tmp_path / "next1.gpkg")
    assert filled.crs == labels.crs and "landcover" in filled.columns
    rows, cols = scene_pixels(filled, scene_files.image)
    filled["landcover"] = [DFC10.names[class_id] for class_id in read_band(scene_files.truth)[rows, cols]]
    merged = gpd.GeoDataFrame(pd.concat([labels, filled[["landcover", "geometry"]]], ignore_index=True), crs=labels.crs)
    merged.to_file(tmp_path / "merged.gpkg", driver="GPKG", engine="pyogrio")
    second = adapt_pixel(
        scene_files,
        tmp_path / "merged.gpkg",
        tmp_path / "map2.tif",
        "--class-column",
        "landcover",
        *suggest(5, tmp_path / "next2.gpkg", SPACING),
    )
    assert second.exit_code == 0, second.output
    assert f"adapted on {len(labels) + 5} labelled pixels" in second.output
    new_rows, new_cols = scene_pixels(gpd.read_file(tmp_path / "next2.gpkg"), scene_files.image)
    assert np.hypot(new_rows[:, None] - rows[None], new_cols[:, None] - cols[None]).min() >= SPACING


@pytest.mark.parametrize(
    "options, words",
    [
        (["--suggest", 0, "--suggest-out", "next.gpkg"], "--suggest must be at least 1"),
        (["--suggest", 5], "--suggest needs --suggest-out"),
        (["--suggest-out", "next.gpkg"], "--suggest-out needs --suggest"),
        (["--suggest", 5, "--suggest-out", "next.gpkg", "--suggest-spacing", -1], "--suggest-spacing"),
    ],
)
def test_bad_suggest_options_exit_2_and_write_nothing(
    options: list[str | int], words: str, scene_files: SceneFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    result = adapt_pixel(scene_files, scene_files.labels, tmp_path / "map.tif", *map(str, options))
    assert result.exit_code == 2 and words in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_suggestions_that_would_overwrite_the_labels_are_refused(scene_files: SceneFiles, tmp_path: Path):
    labels = tmp_path / "labels.gpkg"
    labels.write_bytes(scene_files.labels.read_bytes())
    result = adapt_pixel(scene_files, labels, tmp_path / "map.tif", "--suggest", 5, "--suggest-out", labels)
    assert result.exit_code == 1 and "--suggest-out" in result.stderr and "--labels" in result.stderr, result.output
    assert labels.read_bytes() == scene_files.labels.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels.gpkg"]


@pytest.mark.parametrize("spacing", [24, 100])
def test_a_spacing_too_large_writes_the_points_that_fit_and_says_so(
    spacing: int, scene_files: SceneFiles, tmp_path: Path
):
    """24 px: some of the 5 fit between the 25 labels of the 128 px scene; 100 px: none does."""
    result = adapt_pixel(
        scene_files,
        scene_files.labels,
        tmp_path / "map.tif",
        *suggest(5, tmp_path / "next.gpkg", spacing),
    )
    assert result.exit_code == 0, result.output
    points = gpd.read_file(tmp_path / "next.gpkg")  # the layer is written, with the points that fit
    assert len(points) < 5 and list(points.columns) == ["suggestion", "predicted", "confidence", "class", "geometry"]
    fitted = f"only {len(points)} of the 5 suggestions fit" if len(points) else "no suggestion fits"
    assert f"note: {fitted} {spacing} px apart" in result.stderr
    if spacing == 24:
        assert len(points) > 0
        rows, cols = scene_pixels(points, scene_files.image)
        label_rows, label_cols = scene_pixels(gpd.read_file(scene_files.labels), scene_files.image)
        assert np.hypot(rows[:, None] - label_rows[None], cols[:, None] - label_cols[None]).min() >= 24
