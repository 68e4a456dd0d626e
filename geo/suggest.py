"""Where one more label would help a map most: its least confident places, every class's, spread apart.

A user labelling a new region in rounds labels where the map is most likely wrong. The map's
confidence (the probability of the class it shows, `geo.windows`) is lowest there. A scene of
any size is summarised while it is mapped, strip by strip, into cells of `spacing / 2` pixels
(`ConfidenceCells`): each cell keeps its mean confidence, and its least confident pixel with the
class shown there. Suggestions (`pick_suggestions`) are the least confident pixels of the cells
with the lowest mean confidence, taken in turn from each predicted class, each at least `spacing`
pixels from every suggestion before it and from every existing label; nodata has no confidence
and is never suggested.

Why cells and classes, not just the least confident pixels: a single pixel's confidence is lowest
on the edges between classes, where a label teaches a classifier little (it is a mixed pixel);
a cell's mean is low where the map is unsure over an area. And the least confident cells of a
map made from a handful of labels tend to share one confused pair of classes; taking them class
by class spreads the next labels over every class the map shows. `benchmarks/labelling_loop.py`
measured both rules against random points (`BENCHMARKS.md`).

The points go to a GeoPackage layer in the labels' CRS with the predicted class, the confidence
and an empty class column named like the user's, for the user to fill in QGIS and merge into
their labels (`write_suggestions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
from pyproj import CRS
from scipy.spatial import cKDTree
from shapely.geometry import Point

from geo.atomic import atomic_output
from geo.classes import IGNORE_INDEX, ClassScheme
from geo.export import Grid

SUGGESTION_LAYER = "suggestions"

MIN_DATA_SHARE = 0.5
"""A cell is ranked only when at least this share of its pixels has data: a cell on the scene's
edge or beside nodata would otherwise rank by a few pixels."""

MAX_CELLS = 1 << 22
"""Cells are made larger than `spacing / 2` where a scene would need more (37 bytes each)."""


class ConfidenceCells:
    """Per `cell` x `cell` block of a scene: the mean confidence over its pixels with data, and its
    least confident pixel with the class shown there; filled strip by strip (`add`)."""

    def __init__(self, grid: Grid, cell: int) -> None:
        if cell < 1:
            raise ValueError(f"cell must be at least 1 pixel, got {cell}")
        self.cell = cell
        shape = (math.ceil(grid.height / cell), math.ceil(grid.width / cell))
        self.lowest = np.full(shape, np.inf, np.float32)
        self.rows = np.zeros(shape, np.int64)
        self.cols = np.zeros(shape, np.int64)
        self.classes = np.full(shape, IGNORE_INDEX, np.uint8)
        self.total = np.zeros(shape, np.float64)
        self.count = np.zeros(shape, np.int64)

    @classmethod
    def for_spacing(cls, grid: Grid, spacing: float) -> ConfidenceCells:
        return cls(grid, cell_size(grid, spacing))

    def add(self, top: int, confidence: np.ndarray, classes: np.ndarray) -> None:
        """Scene rows `[top, top + h)`: confidence (h, W) float32 (NaN on nodata) and class ids (h, W)."""
        height, width = confidence.shape
        padded_width = self.lowest.shape[1] * self.cell
        known = np.where(np.isnan(confidence), np.inf, confidence)
        known = np.pad(known, ((0, 0), (0, padded_width - width)), constant_values=np.inf)
        for cell_row in range(top // self.cell, (top + height - 1) // self.cell + 1):
            first = max(cell_row * self.cell, top) - top
            last = min((cell_row + 1) * self.cell, top + height) - top
            blocks = (  # one row per cell of this cell row, its pixels in the strip
                known[first:last]
                .reshape(last - first, -1, self.cell)
                .transpose(1, 0, 2)
                .reshape(-1, (last - first) * self.cell)
            )
            data = np.isfinite(blocks)
            self.total[cell_row] += np.where(data, blocks, 0).sum(axis=1)
            self.count[cell_row] += data.sum(axis=1)
            where = blocks.argmin(axis=1)
            lowest = blocks[np.arange(len(blocks)), where]
            better = lowest < self.lowest[cell_row]
            if not better.any():
                continue
            rows = top + first + where // self.cell
            cols = np.arange(len(blocks)) * self.cell + where % self.cell
            self.lowest[cell_row, better] = lowest[better]
            self.rows[cell_row, better] = rows[better]
            self.cols[cell_row, better] = cols[better]
            self.classes[cell_row, better] = classes[rows[better] - top, cols[better]]

    def mean(self) -> np.ndarray:
        """Mean confidence per cell; inf where less than `MIN_DATA_SHARE` of the cell has data."""
        ranked = self.count >= MIN_DATA_SHARE * self.cell**2
        return np.where(ranked, self.total / np.maximum(self.count, 1), np.inf)


def cell_size(grid: Grid, spacing: float) -> int:
    """Cells of `spacing / 2` pixels (so that two cells' pixels can be `spacing` apart), at least
    1, and large enough that the scene has no more than `MAX_CELLS` of them."""
    fits = math.ceil(math.sqrt(grid.height * grid.width / MAX_CELLS))
    return max(1, int(spacing // 2), fits)


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
    cells: ConfidenceCells, labelled_rows: np.ndarray, labelled_cols: np.ndarray, count: int, spacing: float
) -> Suggestions:
    """Up to `count` pixels: the cells of lowest mean confidence, taken in turns, each turn one
    from each predicted class (the class with the least confident cell first), each pixel at least
    `spacing` pixels from the others and from every labelled pixel; fewer when no more fit."""
    if count < 1:
        raise ValueError(f"the number of suggestions must be at least 1, got {count}")
    mean = cells.mean().reshape(-1)
    rows, cols, classes = cells.rows.reshape(-1), cells.cols.reshape(-1), cells.classes.reshape(-1)
    ranked = np.argsort(mean, kind="stable")
    ranked = ranked[np.isfinite(mean[ranked])]
    if len(labelled_rows) and len(ranked):  # drop the cells too near a label, all at once
        nearest, _ = cKDTree(np.column_stack([labelled_rows, labelled_cols])).query(
            np.column_stack([rows[ranked], cols[ranked]])
        )
        ranked = ranked[nearest >= spacing]
    _, first = np.unique(classes[ranked], return_index=True)
    queues = [iter(ranked[classes[ranked] == classes[ranked[at]]].tolist()) for at in sorted(first)]
    picked: list[int] = []
    while queues and len(picked) < count:  # a turn: each class its next cell that fits, the least confident first
        for queue in list(queues):
            candidate = next((c for c in queue if _fits(c, picked, rows, cols, spacing)), None)
            if candidate is None:
                queues.remove(queue)
                continue
            picked.append(candidate)
            if len(picked) == count:
                break
    chosen = np.asarray(picked, np.int64)
    return Suggestions(
        rows=rows[chosen],
        cols=cols[chosen],
        confidence=cells.lowest.reshape(-1)[chosen],
        class_ids=classes[chosen],
        asked=count,
    )


def _fits(candidate: int, picked: list[int], rows: np.ndarray, cols: np.ndarray, spacing: float) -> bool:
    """Whether a cell's pixel is at least `spacing` pixels from every picked one."""
    return not picked or bool(np.hypot(rows[picked] - rows[candidate], cols[picked] - cols[candidate]).min() >= spacing)


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
