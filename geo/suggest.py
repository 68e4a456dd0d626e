"""Where one more label would help a map most: the places it doubts, over the most area, unlabelled.

A user labelling a new region in rounds labels where the map is most likely wrong. The map's
confidence (the probability of the class it shows, `geo.windows`) is low there; but with the
handful of labels of a first round, the confidence is lowest on the edges between classes (mixed
pixels, which teach a classifier little), and a map can be wrong, and sure, over a whole kind of
ground that no label stands on. So suggestions weigh both doubt and what the ground looks like:

1. While the scene is mapped, strip by strip, it is summarised in cells of `spacing / 2` pixels
   (`ConfidenceCells`): each cell's mean confidence, and the confidence and class at its centre.
2. The cells' centre pixels (their bands, `centre_values`) are clustered with KMeans into kinds
   of ground: as many as there are labelled cells plus the points asked for.
3. Points go one at a time to the kind with the most doubt for its labels: the sum over its
   cells of one minus their mean confidence (the map's expected errors there), divided by one
   plus the labels (and points) it already has. Each point is the centre of that kind's most
   typical cell (nearest its cluster's centre), at least `spacing` pixels from every label and
   every point before it; nodata is never suggested.

`benchmarks/labelling_loop.py` measures this against random points and against the plain least
confident pixels and cells (`BENCHMARKS.md`). The points go to a GeoPackage layer in the labels'
CRS with the predicted class, the confidence and an empty class column named like the user's, for
the user to fill in QGIS and merge into their labels (`write_suggestions`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from pyproj import CRS
from rasterio.windows import Window
from scipy.spatial import cKDTree
from shapely.geometry import Point
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from geo.atomic import atomic_output
from geo.classes import IGNORE_INDEX, ClassScheme
from geo.export import Grid
from geo.readers import read_valid

SUGGESTION_LAYER = "suggestions"

MIN_DATA_SHARE = 0.5
"""A cell is a candidate only when at least this share of its pixels has data: a cell on the
scene's edge or beside nodata would otherwise stand for a few pixels."""

MAX_CELLS = 1 << 20
"""Cells are made larger than `spacing / 2` where a scene would need more: each costs 17 bytes,
and 4 per band for `centre_values`."""

MAX_KINDS = 64
"""The most clusters of ground (KMeans' k), however many labels there are."""

FIT_SAMPLE = 20_000
"""KMeans is fitted on at most this many cells (drawn with a fixed seed), then assigns them all."""


class ConfidenceCells:
    """Per `cell` x `cell` block of a scene: the mean confidence over its pixels with data, and
    the confidence and class at its centre pixel (NaN and 255 on nodata); filled strip by strip."""

    def __init__(self, grid: Grid, cell: int) -> None:
        if cell < 1:
            raise ValueError(f"cell must be at least 1 pixel, got {cell}")
        self.cell = cell
        self.centre_rows = centres(grid.height, cell)
        self.centre_cols = centres(grid.width, cell)
        shape = (self.centre_rows.size, self.centre_cols.size)
        self.total = np.zeros(shape, np.float64)
        self.count = np.zeros(shape, np.int32)
        self.centre_confidence = np.full(shape, np.nan, np.float32)
        self.centre_class = np.full(shape, IGNORE_INDEX, np.uint8)

    @classmethod
    def for_spacing(cls, grid: Grid, spacing: float) -> ConfidenceCells:
        return cls(grid, cell_size(grid, spacing))

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.total.shape
        return rows, cols

    def add(self, top: int, confidence: np.ndarray, classes: np.ndarray) -> None:
        """Scene rows `[top, top + h)`: confidence (h, W) float32 (NaN on nodata) and class ids (h, W)."""
        height, width = confidence.shape
        padded_width = self.shape[1] * self.cell
        data = np.pad(~np.isnan(confidence), ((0, 0), (0, padded_width - width)))
        known = np.pad(np.nan_to_num(confidence, nan=0.0), ((0, 0), (0, padded_width - width)))
        for cell_row in range(top // self.cell, (top + height - 1) // self.cell + 1):
            first = max(cell_row * self.cell, top) - top
            last = min((cell_row + 1) * self.cell, top + height) - top
            self.total[cell_row] += known[first:last].reshape(last - first, -1, self.cell).sum(axis=(0, 2))
            self.count[cell_row] += data[first:last].reshape(last - first, -1, self.cell).sum(axis=(0, 2))
            centre = self.centre_rows[cell_row] - top
            if 0 <= centre < height:
                self.centre_confidence[cell_row] = confidence[centre, self.centre_cols]
                self.centre_class[cell_row] = classes[centre, self.centre_cols]

    def mean(self) -> np.ndarray:
        """Mean confidence per cell; NaN where less than `MIN_DATA_SHARE` of the cell has data."""
        ranked = self.count >= MIN_DATA_SHARE * self.cell**2
        return np.where(ranked, self.total / np.maximum(self.count, 1), np.nan)


def centres(size: int, cell: int) -> np.ndarray:
    """The centre pixel of each cell along an axis of `size` pixels (the last cell's within it)."""
    return np.minimum(np.arange(0, size, cell) + cell // 2, size - 1)


def cell_size(grid: Grid, spacing: float) -> int:
    """Cells of `spacing / 2` pixels (so that two cells' centres can be `spacing` apart), at least
    1, and large enough that the scene has no more than `MAX_CELLS` of them."""
    fits = math.ceil(math.sqrt(grid.height * grid.width / MAX_CELLS))
    return max(1, int(spacing // 2), fits)


def centre_values(image: str | Path, bands: Sequence[int], cells: ConfidenceCells) -> np.ndarray:
    """(cell rows, cell cols, C) float32: the bands `bands` (1-based) at each cell's centre pixel,
    NaN where it has no data; one scene row read per row of cells."""
    values = np.full((*cells.shape, len(bands)), np.nan, np.float32)
    with rasterio.open(image) as src:
        for cell_row, row in enumerate(cells.centre_rows.tolist()):
            pixels, valid = read_valid(src, Window(0, row, src.width, 1), bands)
            on_data = valid[0, cells.centre_cols]
            values[cell_row, on_data] = pixels[:, 0, cells.centre_cols[on_data]].T
    return values


@dataclass(frozen=True)
class Suggestions:
    """Suggested pixels in the order they were picked, and how many were asked for."""

    rows: np.ndarray
    cols: np.ndarray
    confidence: np.ndarray
    """The confidence of the map at each pixel."""
    class_ids: np.ndarray
    """The class the map shows at each pixel."""
    asked: int

    def __len__(self) -> int:
        return int(self.rows.size)


def pick_suggestions(
    cells: ConfidenceCells,
    values: np.ndarray,
    labelled_rows: np.ndarray,
    labelled_cols: np.ndarray,
    count: int,
    spacing: float,
) -> Suggestions:
    """Up to `count` cell centres (the module docstring says how they are chosen) from the cells'
    summary and their centres' bands `values` (`centre_values`), each at least `spacing` pixels
    from the others and from every labelled pixel; fewer when no more fit."""
    if count < 1:
        raise ValueError(f"the number of suggestions must be at least 1, got {count}")
    mean = cells.mean().reshape(-1)
    flat_values = values.reshape(mean.size, -1)
    candidates = np.flatnonzero(
        np.isfinite(mean) & np.isfinite(cells.centre_confidence.reshape(-1)) & np.isfinite(flat_values).all(axis=1)
    )
    n_cols = cells.shape[1]
    rows = cells.centre_rows[candidates // n_cols]
    cols = cells.centre_cols[candidates % n_cols]
    labelled_cells = (np.asarray(labelled_rows) // cells.cell) * n_cols + np.asarray(labelled_cols) // cells.cell
    picked: list[int] = []  # indexes into candidates
    if len(candidates):
        kind, from_centre = _kinds(flat_values[candidates], len(np.unique(labelled_cells)) + count)
        doubt = np.bincount(kind, weights=1 - mean[candidates])
        where = np.minimum(np.searchsorted(candidates, labelled_cells), len(candidates) - 1)
        in_candidates = candidates[where] == labelled_cells
        labels_in = np.bincount(kind[where[in_candidates]], minlength=doubt.size).astype(np.float64)
        away = np.ones(len(candidates), bool)
        if len(labelled_rows):
            nearest, _ = cKDTree(np.column_stack([labelled_rows, labelled_cols])).query(np.column_stack([rows, cols]))
            away = np.asarray(nearest >= spacing)
        queues = {  # each kind's cells that keep away from the labels, the most typical first
            group: iter(members[np.argsort(from_centre[members], kind="stable")].tolist())
            for group in range(doubt.size)
            for members in [np.flatnonzero((kind == group) & away)]
        }
        while queues and len(picked) < count:
            group = max(queues, key=lambda g: (doubt[g] / (1 + labels_in[g]), -g))
            member = next(
                (m for m in queues[group] if _fits(rows[m], cols[m], rows[picked], cols[picked], spacing)), None
            )
            if member is None:
                del queues[group]
                continue
            picked.append(member)
            labels_in[group] += 1
    chosen = candidates[np.asarray(picked, np.int64)]
    return Suggestions(
        rows=cells.centre_rows[chosen // n_cols],
        cols=cells.centre_cols[chosen % n_cols],
        confidence=cells.centre_confidence.reshape(-1)[chosen],
        class_ids=cells.centre_class.reshape(-1)[chosen],
        asked=count,
    )


def _kinds(values: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """KMeans clusters of the rows of `values` (z-scored per column; `wanted` clusters, within
    1..`MAX_KINDS` and the rows): each row's cluster, and its distance to the cluster's centre."""
    values = values.astype(np.float64)
    scaled = (values - values.mean(axis=0)) / np.maximum(values.std(axis=0), 1e-12)
    k = max(1, min(len(scaled), wanted, MAX_KINDS))
    sample = scaled
    if len(scaled) > FIT_SAMPLE:
        sample = scaled[np.random.default_rng(0).choice(len(scaled), FIT_SAMPLE, replace=False)]
    with warnings.catch_warnings():  # fewer distinct cells than k (a flat scene): fewer kinds, as it should be
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=k, n_init=3, random_state=0).fit(sample)
    kind = kmeans.predict(scaled)
    return kind, np.linalg.norm(scaled - kmeans.cluster_centers_[kind], axis=1)


def _fits(row: int, col: int, picked_rows: np.ndarray, picked_cols: np.ndarray, spacing: float) -> bool:
    """Whether a pixel is at least `spacing` pixels from every picked one."""
    return not picked_rows.size or bool(np.hypot(picked_rows - row, picked_cols - col).min() >= spacing)


def write_suggestions(
    path: str | Path,
    suggestions: Suggestions,
    grid: Grid,
    scheme: ClassScheme,
    *,
    class_column: str,
    crs: CRS | None,
) -> Path:
    """A GeoPackage point layer of the suggestions in `crs` (the labels'; None: the scene's):
    `suggestion` (1 = least confident), `predicted` (class name), `confidence`, and an empty
    `class_column` to fill in."""
    transform = grid.vector_transform
    centres = [transform * (col + 0.5, row + 0.5) for row, col in zip(suggestions.rows, suggestions.cols)]
    frame = gpd.GeoDataFrame(
        {
            "suggestion": np.arange(1, len(suggestions) + 1, dtype=np.int32),
            "predicted": [scheme.names[class_id] for class_id in suggestions.class_ids],
            "confidence": suggestions.confidence.astype(np.float64).round(4),
            class_column: np.full(len(suggestions), None, dtype=object),
        },
        geometry=[Point(x, y) for x, y in centres],
        crs=grid.crs,
    )
    if crs is not None and grid.crs is not None:
        frame = frame.to_crs(crs)
    frame[class_column] = frame[class_column].astype("string")  # a text column QGIS lets the user type in
    with atomic_output(path) as tmp:
        frame.to_file(tmp, layer=SUGGESTION_LAYER, driver="GPKG", engine="pyogrio")
    return Path(path)
