"""Sliding-window prediction over a GeoTIFF of any size, in memory bounded by one strip of windows.

Windows of `window` pixels overlap by `overlap` pixels and go to the model in batches. Each
window's class scores become probabilities (softmax) which are averaged with a linear-ramp weight
that falls towards the window's edges, as raster-vision does: the weights change smoothly, so no
seam shows where windows meet, and pixels near a window's edge, where the model sees little
context, count least (the sum is divided by the summed weights, so any overlap averages right).
We average probabilities rather than scores so that one window's over-confident scores cannot
outvote its neighbours, and the probabilities written are the very numbers the class map is the
argmax of.

Windows are processed one row of windows at a time; once a row is done, every scene row above the
next row of windows is final and is written out. So only `window` scene rows of pixels and scores
are ever in memory: memory grows with the scene's width, never with its height. The last window
of a row or column is moved back to end at the scene's edge, so only a scene smaller than one
window is padded (with zeros).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.windows import Window

from geo.classes import IGNORE_INDEX, ClassScheme
from geo.errors import DataError
from geo.export import GDAL_CACHE_BYTES, Grid, class_raster_writer, probability_writer, style_path
from geo.readers import read_valid, scene_scaling

PredictBatch = Callable[[np.ndarray], np.ndarray]
"""(B, C, h, w) float32 scaled pixels -> (B, K, h, w) float32 class scores (logits; -inf rules a class out)."""


@dataclass(frozen=True)
class SceneMap:
    """What `predict_scene` wrote; `georeferenced` False means pixel coordinates (the CLI says so)."""

    classes: Path
    style: Path
    probabilities: Path | None
    grid: Grid
    valid_pixels: int

    @property
    def georeferenced(self) -> bool:
        return self.grid.georeferenced


@dataclass(frozen=True)
class _Strip:
    """Finished scene rows `[row, row + height)`: averaged probabilities (K, h, W) and validity (h, W)."""

    row: int
    probabilities: np.ndarray
    valid: np.ndarray


def predict_scene(
    image_path: str | Path,
    predict_batch: PredictBatch,
    out_classes: str | Path,
    *,
    scheme: ClassScheme,
    window: int = 256,
    overlap: int = 64,
    batch_size: int = 8,
    scale: Callable[[np.ndarray], np.ndarray] | None = None,
    bands: Sequence[int] | None = None,
    probabilities_path: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SceneMap:
    """Map a scene: a class-map COG (+ QGIS style) and optionally a probability COG, on its grid.

    `bands` are 1-based band indexes fed to the model, in that order (default: all); `scale` turns
    raw pixels of those bands into model input (default: `scale_image` with the scene's scale/offset
    tags of those bands). Pixels where every band is nodata (the dataset mask), or where a band read
    is not finite (NaN, +-inf; zeroed before the model sees them), get class 255 and NaN
    probabilities. `progress(rows_done, rows)` is called after each finished strip. Deterministic
    for a deterministic `predict_batch`. Nothing appears at the output paths unless all succeeds.
    """
    _check_geometry(window, overlap, batch_size)
    if scheme.num_classes >= IGNORE_INDEX:
        raise ValueError(f"{scheme.num_classes} classes do not fit uint8 class ids below {IGNORE_INDEX}")
    valid_pixels = 0
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), _open_scene(image_path) as src:
        grid = Grid.of(src)
        indexes = _band_indexes(src, bands)
        scaling = scale if scale is not None else scene_scaling(src, indexes)
        with contextlib.ExitStack() as outputs:
            classes_dst = outputs.enter_context(class_raster_writer(out_classes, scheme, grid))
            probabilities_dst = (
                outputs.enter_context(probability_writer(probabilities_path, scheme, grid))
                if probabilities_path is not None
                else None
            )
            strips = _stitched_strips(
                src,
                indexes,
                predict_batch,
                scaling,
                scheme.num_classes,
                window=window,
                overlap=overlap,
                batch_size=batch_size,
            )
            for strip in strips:
                _write_strip(strip, classes_dst, probabilities_dst)
                valid_pixels += int(strip.valid.sum())
                if progress is not None:
                    progress(strip.row + strip.valid.shape[0], grid.height)
    return SceneMap(
        classes=Path(out_classes),
        style=style_path(out_classes),
        probabilities=None if probabilities_path is None else Path(probabilities_path),
        grid=grid,
        valid_pixels=valid_pixels,
    )


def _write_strip(strip: _Strip, classes_dst: DatasetWriter, probabilities_dst: DatasetWriter | None) -> None:
    """Class ids (argmax, 255 on nodata) and probabilities (NaN on nodata) of finished rows."""
    rows = Window(0, strip.row, strip.valid.shape[1], strip.valid.shape[0])
    classes = strip.probabilities.argmax(axis=0).astype(np.uint8)
    classes[~strip.valid] = IGNORE_INDEX
    classes_dst.write(classes, 1, window=rows)
    if probabilities_dst is not None:
        strip.probabilities[:, ~strip.valid] = np.nan
        probabilities_dst.write(strip.probabilities, window=rows)


def window_starts(size: int, window: int, overlap: int) -> list[int]:
    """Offsets of windows along one axis, `window - overlap` apart, the last flush with the edge."""
    if size <= window:
        return [0]
    return [*range(0, size - window, window - overlap), size - window]


def blend_weights(window: int, overlap: int) -> np.ndarray:
    """(window, window) weight: product of linear ramps over `overlap` pixels at each edge.

    Ramps of neighbouring windows `window - overlap` apart sum to exactly one, so the blend is
    seamless; the weight never reaches zero, so a scene-edge pixel seen by one window keeps it.
    """
    centre = np.arange(window) + 0.5
    ramp = np.minimum(1.0, np.minimum(centre, window - centre) / overlap) if overlap else np.ones(window)
    return np.outer(ramp, ramp).astype(np.float32)


def softmax(scores: np.ndarray, axis: int = 1) -> np.ndarray:
    """Numerically stable softmax over the class axis, float32."""
    shifted = scores.astype(np.float32) - scores.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def _stitched_strips(
    src: DatasetReader,
    indexes: list[int],
    predict_batch: PredictBatch,
    scale: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    *,
    window: int,
    overlap: int,
    batch_size: int,
) -> Iterator[_Strip]:
    """Predict one row of windows at a time; yield the rows no later window touches."""
    weights = blend_weights(window, overlap)
    row_starts = window_starts(src.height, window, overlap)
    col_starts = window_starts(src.width, window, overlap)
    strip_height = min(window, src.height)
    total = np.zeros((num_classes, strip_height, src.width), np.float32)
    weight_sum = np.zeros((strip_height, src.width), np.float32)
    for top, next_top in zip(row_starts, [*row_starts[1:], src.height]):
        pixels, valid = _read_strip(src, indexes, top, strip_height, window)
        for first in range(0, len(col_starts), batch_size):
            lefts = col_starts[first : first + batch_size]
            batch = np.stack([pixels[:, :, left : left + window] for left in lefts])
            probabilities = _window_probabilities(predict_batch, scale, batch, num_classes)
            _accumulate(total, weight_sum, weights, lefts, probabilities)
        done = next_top - top
        yield _Strip(top, total[:, :done] / weight_sum[:done], valid[:done])
        _shift_up(total, done)
        _shift_up(weight_sum, done)


def _accumulate(
    total: np.ndarray, weight_sum: np.ndarray, weights: np.ndarray, lefts: list[int], probabilities: np.ndarray
) -> None:
    """Add weighted window probabilities into the strip, cropping what lies beyond the scene."""
    height, width = weight_sum.shape
    for left, window_probabilities in zip(lefts, probabilities):
        right = min(left + weights.shape[1], width)
        weight = weights[:height, : right - left]
        total[:, :, left:right] += window_probabilities[:, :height, : right - left] * weight
        weight_sum[:, left:right] += weight


def _window_probabilities(
    predict_batch: PredictBatch, scale: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, num_classes: int
) -> np.ndarray:
    scores = np.asarray(predict_batch(np.asarray(scale(batch), dtype=np.float32)))
    expected = (batch.shape[0], num_classes, *batch.shape[2:])
    if scores.shape != expected:
        raise ValueError(
            f"predict_batch returned scores of shape {scores.shape}; expected {expected} "
            f"(batch, classes of the scheme, height, width)"
        )
    probabilities = softmax(scores)
    if np.isnan(probabilities).any():
        raise ValueError("predict_batch returned NaN scores (or -inf for every class)")
    return probabilities


def _read_strip(
    src: DatasetReader, indexes: list[int], top: int, height: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (C, >=window, >=window) of scene rows [top, top + height), zero-padded only when the
    scene is smaller than a window, and where they hold data (`geo.readers.read_valid`), (height, W)."""
    pixels, valid = read_valid(src, Window(0, top, src.width, height), indexes)
    if height < window or src.width < window:
        pixels = np.pad(pixels, ((0, 0), (0, max(0, window - height)), (0, max(0, window - src.width))))
    return pixels, valid


def _shift_up(array: np.ndarray, rows: int) -> None:
    """Move the not yet finished rows of a strip buffer to its top and clear the rest."""
    keep = array.shape[-2] - rows
    array[..., :keep, :] = array[..., rows:, :]
    array[..., keep:, :] = 0


@contextlib.contextmanager
def _open_scene(path: str | Path) -> Iterator[DatasetReader]:
    try:
        src = rasterio.open(path)
    except RasterioError as error:
        raise DataError(path, f"cannot open the image: {error}") from None
    with src:
        yield src


def _band_indexes(src: DatasetReader, bands: Sequence[int] | None) -> list[int]:
    if bands is None:
        return list(src.indexes)
    wrong = [band for band in bands if not 1 <= band <= src.count]
    if wrong:
        raise DataError(src.name, f"has {src.count} bands; cannot read band(s) {wrong} (1-based)")
    return list(bands)


def _check_geometry(window: int, overlap: int, batch_size: int) -> None:
    if window < 1 or batch_size < 1:
        raise ValueError(f"window ({window}) and batch_size ({batch_size}) must be positive")
    if not 0 <= overlap <= window // 2:
        raise ValueError(f"overlap ({overlap}) must lie in 0..window/2 ({window // 2}) so edge ramps fit")
