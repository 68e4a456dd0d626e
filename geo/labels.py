"""A user's few labels (points or polygons in any CRS) as labelled pixels of the scene they label.

Labels come as GeoPackage, GeoJSON or Shapefile with a column of class names (matched
case-insensitively) or class ids. Points label the pixel they fall in; polygons the pixels whose
centres they cover (a polygon too small to cover any centre labels the pixel under its
representative point, so no label vanishes silently); lines the pixels they cross. Labels are kept
sparse (row, col, class arrays): the scene may be far larger than memory, the labels never are.
Every problem with the file raises `DataError` naming it and saying what to fix.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
from pyproj import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError, WindowError
from rasterio.features import rasterize
from rasterio.transform import rowcol
from rasterio.windows import Window, from_bounds
from rasterio.windows import transform as window_transform
from shapely.geometry.base import BaseGeometry

from geo.classes import IGNORE_INDEX, ClassScheme
from geo.errors import DataError
from geo.export import Grid


@dataclass(frozen=True)
class LabelledPixels:
    """Labelled pixels of a scene: parallel int64 arrays `rows`, `cols`, `class_ids`.

    A pixel labelled twice with different classes is dropped and counted in `conflicting`.
    """

    rows: np.ndarray
    cols: np.ndarray
    class_ids: np.ndarray
    grid: Grid
    conflicting: int = 0

    def __len__(self) -> int:
        return int(self.rows.size)

    def raster(self, window: Window | None = None) -> np.ndarray:
        """uint8 label raster (255 = unlabelled) of the whole scene or of `window` of it."""
        window = window or Window(0, 0, self.grid.width, self.grid.height)
        row_off, col_off = int(window.row_off), int(window.col_off)
        out = np.full((int(window.height), int(window.width)), IGNORE_INDEX, dtype=np.uint8)
        inside = (
            (self.rows >= row_off)
            & (self.rows < row_off + out.shape[0])
            & (self.cols >= col_off)
            & (self.cols < col_off + out.shape[1])
        )
        out[self.rows[inside] - row_off, self.cols[inside] - col_off] = self.class_ids[inside]
        return out


def read_labels(
    vector_path: str | Path,
    scene_path: str | Path,
    scheme: ClassScheme,
    class_column: str = "class",
    *,
    layer: str | None = None,
) -> LabelledPixels:
    """Read labelled points/polygons and place them on the scene's pixel grid.

    Labels in another CRS are reprojected to the scene's; labels without a CRS are taken to be in
    the scene's CRS (or, for a scene without one, in the pixel coordinates QGIS shows it in:
    x = col, y = -row). Every label must touch the scene.
    """
    grid = _scene_grid(scene_path)
    frame = _read_frame(vector_path, layer)
    class_ids = _class_ids(frame, class_column, scheme, vector_path)
    frame = _to_scene_crs(frame, grid, vector_path, scene_path)
    pixels = [_label_pixels(geometry, grid) for geometry in frame.geometry]
    outside = sum(1 for rows, _ in pixels if rows.size == 0)
    if outside:
        raise DataError(
            vector_path,
            f"{outside} of {len(frame)} labels fall outside the scene {scene_path} "
            f"(scene bounds {_bounds(grid)}{'' if grid.crs is None else f' in {grid.crs}'}); "
            "check the labels' CRS or remove them",
        )
    labels = [np.full(label_rows.size, class_id) for (label_rows, _), class_id in zip(pixels, class_ids)]
    return _deduplicated(
        np.concatenate([label_rows for label_rows, _ in pixels]),
        np.concatenate([label_cols for _, label_cols in pixels]),
        np.concatenate(labels),
        grid,
    )


def labels_crs(vector_path: str | Path, layer: str | None = None) -> CRS | None:
    """The CRS of a labels file (None when it has none), read without its features."""
    try:
        found = pyogrio.read_info(vector_path, layer=layer)["crs"]
    except Exception as error:  # pyogrio raises several unrelated types for unreadable files
        raise DataError(vector_path, f"cannot read the labels file: {error}") from None
    return CRS.from_user_input(found) if found else None


def _scene_grid(scene_path: str | Path) -> Grid:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(scene_path) as src:
                return Grid.of(src)
    except RasterioError as error:
        raise DataError(scene_path, f"cannot open the scene: {error}") from None


def _read_frame(vector_path: str | Path, layer: str | None) -> gpd.GeoDataFrame:
    try:
        frame = gpd.read_file(vector_path, layer=layer, engine="pyogrio")
    except Exception as error:  # pyogrio raises several unrelated types for unreadable files
        raise DataError(vector_path, f"cannot read the labels file: {error}") from None
    if not isinstance(frame, gpd.GeoDataFrame):
        raise DataError(vector_path, "holds a table without geometries, not labelled points or polygons")
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    if frame.empty:
        raise DataError(vector_path, "holds no labelled features (no rows with a geometry)")
    return frame


def _class_ids(frame: gpd.GeoDataFrame, column: str, scheme: ClassScheme, path: str | Path) -> np.ndarray:
    """Class ids of every row from a column of names (any case) or of ids."""
    if column not in frame.columns:
        columns = ", ".join(str(name) for name in frame.columns if name != frame.geometry.name) or "none"
        raise DataError(path, f"has no class column {column!r}; its columns: {columns}")
    values = frame[column]
    blank = values.isna() | (values.astype(str).str.strip() == "")
    if blank.any():
        first = int(np.flatnonzero(blank.to_numpy())[0])
        raise DataError(
            path,
            f"{int(blank.sum())} features have no value (blank or null) in column {column!r}, the first in row {first}",
        )
    if pd.api.types.is_numeric_dtype(values):
        return _checked_ids(values.to_numpy(), scheme, path, column)
    names = values.astype(str).str.strip()
    if names.str.fullmatch(r"\d+").all():
        return _checked_ids(names.astype(int).to_numpy(), scheme, path, column)
    lookup = {name.casefold(): class_id for class_id, name in enumerate(scheme.names)}
    unknown = sorted({name for name in names if name.casefold() not in lookup})
    if unknown:
        raise DataError(
            path,
            f"unknown class name(s) in column {column!r}: {', '.join(unknown)}; "
            f"valid classes of {scheme.name}: {', '.join(scheme.names)}",
        )
    return np.array([lookup[name.casefold()] for name in names], dtype=np.int64)


def _checked_ids(values: np.ndarray, scheme: ClassScheme, path: str | Path, column: str) -> np.ndarray:
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise DataError(path, f"column {column!r} holds non-integer class ids")
    ids = values.astype(np.int64)
    wrong = sorted(set(ids[(ids < 0) | (ids >= scheme.num_classes)].tolist()))
    if wrong:
        raise DataError(
            path,
            f"class ids {wrong} in column {column!r} are out of range: "
            f"{scheme.name} has ids 0-{scheme.num_classes - 1} ({', '.join(scheme.names)})",
        )
    return ids


def _to_scene_crs(
    frame: gpd.GeoDataFrame, grid: Grid, vector_path: str | Path, scene_path: str | Path
) -> gpd.GeoDataFrame:
    if frame.crs is None:
        return frame
    if grid.crs is None:
        raise DataError(
            vector_path,
            f"labels are in {frame.crs.to_string()} but the scene {scene_path} has no CRS; "
            "give the labels without a CRS, in pixel coordinates (x = col, y = -row)",
        )
    return frame.to_crs(grid.crs.to_wkt())


def _label_pixels(geometry: BaseGeometry, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) inside the scene that one label covers; empty when it misses the scene."""
    if geometry.geom_type in ("Point", "MultiPoint"):
        points = np.array([(point.x, point.y) for point in getattr(geometry, "geoms", [geometry])])
        rows, cols = rowcol(grid.vector_transform, points[:, 0], points[:, 1])
        return _inside(np.asarray(rows), np.asarray(cols), grid)
    window = _pixel_window(geometry, grid)
    if window is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    covered = rasterize(
        [geometry],
        out_shape=(int(window.height), int(window.width)),
        transform=window_transform(window, grid.vector_transform),
        fill=0,
        default_value=1,
        dtype="uint8",
    )
    rows, cols = np.nonzero(covered)
    if rows.size == 0:  # smaller than a pixel: label the pixel under it
        return _label_pixels(geometry.representative_point(), grid)
    return rows + int(window.row_off), cols + int(window.col_off)


def _pixel_window(geometry: BaseGeometry, grid: Grid) -> Window | None:
    """The geometry's bounding window, grown to whole pixels and cut to the scene; None if outside."""
    exact = from_bounds(*geometry.bounds, transform=grid.vector_transform)
    col, row = math.floor(exact.col_off), math.floor(exact.row_off)
    width = max(1, math.ceil(exact.col_off + exact.width) - col)
    height = max(1, math.ceil(exact.row_off + exact.height) - row)
    window = Window(col, row, width, height)
    try:
        window = window.intersection(Window(0, 0, grid.width, grid.height))
    except WindowError:
        return None
    return window if window.width >= 1 and window.height >= 1 else None


def _inside(rows: np.ndarray, cols: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    keep = (rows >= 0) & (rows < grid.height) & (cols >= 0) & (cols < grid.width)
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


def _deduplicated(rows: np.ndarray, cols: np.ndarray, labels: np.ndarray, grid: Grid) -> LabelledPixels:
    """One entry per pixel; pixels labelled with two different classes are dropped and counted."""
    flat = rows * grid.width + cols
    pairs = np.unique(np.stack([flat, labels]), axis=1)
    pixel, count = np.unique(pairs[0], return_counts=True)
    conflicted = pixel[count > 1]
    pairs = pairs[:, ~np.isin(pairs[0], conflicted)]
    return LabelledPixels(
        rows=pairs[0] // grid.width,
        cols=pairs[0] % grid.width,
        class_ids=pairs[1].astype(np.int64),
        grid=grid,
        conflicting=int(conflicted.size),
    )


def _bounds(grid: Grid) -> str:
    left, top = grid.vector_transform @ (0, 0)
    right, bottom = grid.vector_transform @ (grid.width, grid.height)
    return f"x {min(left, right):g}..{max(left, right):g}, y {min(top, bottom):g}..{max(top, bottom):g}"
