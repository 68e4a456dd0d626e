"""Where one more label would help a map most: its least confident places, spread apart.

A user labelling a new region in rounds labels where the map is most likely wrong. The map's
confidence (the probability of the class it shows, `geo.windows`) is lowest there. A scene of
any size is summarised while it is mapped, strip by strip, into cells of `spacing / 2` pixels:
each cell keeps its least confident pixel (`LeastConfident`). Suggestions are then the least
confident cells' pixels, taken greedily, each at least `spacing` pixels from every suggestion
before it and from every existing label (`pick_suggestions`). Nodata has no confidence and is
never suggested. The points go to a GeoPackage layer in the labels' CRS with the predicted class,
the confidence and an empty class column named like the user's, for the user to fill in QGIS and
merge into their labels (`write_suggestions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
from pyproj import CRS
from shapely.geometry import Point

from geo.atomic import atomic_output
from geo.classes import IGNORE_INDEX, ClassScheme
from geo.export import Grid

SUGGESTION_LAYER = "suggestions"


class LeastConfident:
    """The least confident pixel of each `cell` x `cell` block of a scene, filled strip by strip."""

    def __init__(self, grid: Grid, cell: int) -> None:
        if cell < 1:
            raise ValueError(f"cell must be at least 1 pixel, got {cell}")
        self.cell = cell
        shape = (math.ceil(grid.height / cell), math.ceil(grid.width / cell))
        self.confidence = np.full(shape, np.inf, np.float32)
        self.rows = np.zeros(shape, np.int64)
        self.cols = np.zeros(shape, np.int64)
        self.classes = np.full(shape, IGNORE_INDEX, np.uint8)
        self.total = np.zeros(shape, np.float64)
        self.count = np.zeros(shape, np.int64)

    def add(self, top: int, confidence: np.ndarray, classes: np.ndarray) -> None:
        """Scene rows `[top, top + h)`: confidence (h, W) float32 (NaN on nodata) and class ids."""
        height, width = confidence.shape
        padded_width = self.confidence.shape[1] * self.cell
        import os
        from scipy import ndimage
        radius = int(os.environ.get("SUGGEST_EDGE", "0"))
        if radius:
            size = 2 * radius + 1
            edge = ndimage.maximum_filter(classes, size=size) != ndimage.minimum_filter(classes, size=size)
            confidence = np.where(edge, np.nan, confidence)
        known = np.where(np.isnan(confidence), np.inf, confidence)
        known = np.pad(known, ((0, 0), (0, padded_width - width)), constant_values=np.inf)
        for cell_row in range(top // self.cell, (top + height - 1) // self.cell + 1):
            first = max(cell_row * self.cell, top) - top
            last = min((cell_row + 1) * self.cell, top + height) - top
            block = (
                known[first:last]
                .reshape(last - first, -1, self.cell)
                .transpose(1, 0, 2)
                .reshape(-1, (last - first) * self.cell)
            )
            where = block.argmin(axis=1)
            lowest = block[np.arange(len(block)), where]
            data = np.isfinite(block)
            self.total[cell_row] += np.where(data, block, 0).sum(axis=1)
            self.count[cell_row] += data.sum(axis=1)
            better = lowest < self.confidence[cell_row]
            if not better.any():
                continue
            rows = top + first + where // self.cell
            cols = np.arange(len(block)) * self.cell + where % self.cell
            self.confidence[cell_row, better] = lowest[better]
            self.rows[cell_row, better] = rows[better]
            self.cols[cell_row, better] = cols[better]
            self.classes[cell_row, better] = classes[rows[better] - top, cols[better]]


@dataclass(frozen=True)
class Suggestions:
    """Suggested pixels, least confident first, and how many were asked for."""

    rows: np.ndarray
    cols: np.ndarray
    confidence: np.ndarray
    class_ids: np.ndarray
    asked: int

    def __len__(self) -> int:
        return int(self.rows.size)


def pick_suggestions(
    cells: LeastConfident, labelled_rows: np.ndarray, labelled_cols: np.ndarray, count: int, spacing: float
) -> Suggestions:
    """Up to `count` of the least confident cells' pixels, each at least `spacing` pixels from
    the others and from every labelled pixel; fewer when no more fit."""
    if count < 1:
        raise ValueError(f"the number of suggestions must be at least 1, got {count}")
    import os
    if os.environ.get("SUGGEST_MODE") == "mean":
        score = np.where(cells.count >= cells.cell**2 / 2, cells.total / np.maximum(cells.count, 1), np.inf)
    else:
        score = cells.confidence
    if os.environ.get("SUGGEST_MODE") == "balanced":
        score = np.where(cells.count >= cells.cell**2 / 2, cells.total / np.maximum(cells.count, 1), np.inf)
    order = np.argsort(score, axis=None, kind="stable")
    order = order[np.isfinite(score.reshape(-1)[order])]
    if os.environ.get("SUGGEST_MODE") == "balanced":  # round-robin over the predicted classes
        by_class = [order[cells.classes.reshape(-1)[order] == c] for c in np.unique(cells.classes.reshape(-1)[order])]
        by_class.sort(key=lambda members: float(score.reshape(-1)[members[0]]))
        longest = max(len(members) for members in by_class)
        order = np.array([m[i] for i in range(longest) for m in by_class if i < len(m)], dtype=np.int64)
    taken_rows = list(np.asarray(labelled_rows, np.float64))
    taken_cols = list(np.asarray(labelled_cols, np.float64))
    picked: list[int] = []
    rows, cols = cells.rows.reshape(-1), cells.cols.reshape(-1)
    for flat in order.tolist():
        if taken_rows:
            distance = np.hypot(np.asarray(taken_rows) - rows[flat], np.asarray(taken_cols) - cols[flat])
            if distance.min() < spacing:
                continue
        picked.append(flat)
        taken_rows.append(float(rows[flat]))
        taken_cols.append(float(cols[flat]))
        if len(picked) == count:
            break
    chosen = np.asarray(picked, np.int64)
    return Suggestions(
        rows=rows[chosen],
        cols=cols[chosen],
        confidence=cells.confidence.reshape(-1)[chosen],
        class_ids=cells.classes.reshape(-1)[chosen],
        asked=count,
    )


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
