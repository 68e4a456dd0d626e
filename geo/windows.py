"""Sliding-window prediction over a GeoTIFF of any size, in memory bounded by one strip of windows.

Windows of `window` pixels overlap by `overlap` pixels and go to the model in batches. Each
window's class probabilities (the model's own softmax) are averaged with a linear-ramp weight
that falls towards the window's edges, as raster-vision does: the weights change smoothly, so no
seam shows where windows meet, and pixels near a window's edge, where the model sees little
context, count least (the sum is divided by the summed weights, so any overlap averages right).
We average probabilities rather than logits so that one window's over-confident logits cannot
outvote its neighbours, and the probabilities written are the very numbers the class map is the
argmax of.

Windows are processed one row of windows at a time; once a row is done, every scene row above the
next row of windows is final and is written out. So only `window` scene rows of pixels and probabilities
are ever in memory: memory grows with the scene's width, never with its height. The last window
of a row or column is moved back to end at the scene's edge, so only a scene smaller than one
window is padded (with zeros).

Prediction is a pipeline of three stages, and by default each runs in its own thread so that the
network never waits for the disk: a reader thread reads a strip, cuts and scales its batches of
windows (with its own dataset handle: a rasterio dataset is not thread-safe; GDAL reads without the
GIL); the caller's thread runs `predict_batch`, the network, and nothing else (a CUDA context
stays in the thread that made it); a writer thread stitches the probabilities and writes finished
rows. A stage hands an item on and waits until the next stage has taken it,
so each works at most one batch ahead and memory stays a few batches above one thread's. Items
keep their order, so the output is byte for byte what the same stages write one after the other
in one thread (`pipelined=False`). An exception in any stage stops the others and is raised in
the caller's thread as it was raised (a `DataError` naming the file, a `ValueError` about the
probabilities, the network's own error); the outputs are then never renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import queue
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import rasterio
import rasterio.env
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.windows import Window

from geo.classes import IGNORE_INDEX, ClassScheme
from geo.errors import DataError
from geo.export import (
    GDAL_CACHE_BYTES,
    Grid,
    class_raster_writer,
    confidence_writer,
    probability_writer,
    style_path,
)
from geo.readers import read_valid, scene_scaling
from geo.suggest import ConfidenceCells

PredictBatch = Callable[[np.ndarray], np.ndarray]
"""(B, C, h, w) float32 scaled pixels -> (B, K, h, w) float32 class probabilities (each pixel's sum
to 1; 0 rules a class out).

Probabilities, not logits: every predictor of this project ends in a softmax (or a classical
model's `predict_proba`), so logits would only be exponentiated twice. Return a new array each
call: prediction keeps it while the next batch runs."""

ARGMAX_ROWS = 32
_POLL_SECONDS = 0.1
"""How often a stage waiting for another looks whether the pipeline has stopped."""


@dataclass(frozen=True)
class SceneMap:
    """What `predict_scene` wrote; `georeferenced` False means pixel coordinates (the CLI says so)."""

    classes: Path
    style: Path
    probabilities: Path | None
    confidence: Path | None
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


@dataclass(frozen=True)
class _Batch:
    """Windows of one strip at columns `lefts`, scaled: (B, C, window, window) float32."""

    lefts: list[int]
    pixels: np.ndarray


@dataclass(frozen=True)
class _Scores:
    """The class probabilities the network gave for the windows at `lefts`: (B, K, window, window)."""

    lefts: list[int]
    probabilities: np.ndarray


@dataclass(frozen=True)
class _StripEnd:
    """Every window of the strip at `top` is in: its first `rows` rows are final; `valid` (rows, W)."""

    top: int
    rows: int
    valid: np.ndarray


@dataclass(frozen=True)
class _Written:
    """Scene rows `[0, rows_done)` are written; `valid_pixels` of the strip just written hold data."""

    rows_done: int
    valid_pixels: int


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
    confidence_path: str | Path | None = None,
    confidence_cells: ConfidenceCells | None = None,
    progress: Callable[[int, int], None] | None = None,
    pipelined: bool = True,
) -> SceneMap:
    """Map a scene: a class-map COG (+ QGIS style), and optionally a probability COG and a
    confidence COG (the shown class's probability, + a ramp style), on its grid;
    `confidence_cells` (`geo.suggest`) summarises that confidence for `adapt --suggest`.

    `bands` are 1-based band indexes fed to the model, in that order (default: all); `scale` turns
    the raw pixels (C, window, window) of those bands in one window into model input (default:
    `scale_image` with the scene's scale/offset tags of those bands). Pixels where every band is
    nodata (the dataset mask), or where a band read is not finite (NaN, +-inf; zeroed before the
    model sees them), get class 255 and NaN probabilities. `progress(rows_done, rows)` is called
    after each finished strip. Deterministic for a deterministic `predict_batch`. Nothing appears
    at the output paths unless all succeeds.

    `predict_batch` and `progress` are called in the caller's thread only. `pipelined` (default):
    reading (and `scale`) runs in a reader thread and stitching and writing in a writer thread,
    overlapping the network (see the module's docstring); False runs every stage in the caller's
    thread. Both write the same bytes.
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
            confidence_dst = (
                outputs.enter_context(confidence_writer(confidence_path, grid)) if confidence_path is not None else None
            )
            stitcher = _Stitcher(scheme.num_classes, grid, window, overlap)

            def read(dataset: DatasetReader) -> Iterator[_Batch | _StripEnd]:
                return _read_batches(dataset, indexes, scaling, window=window, overlap=overlap, batch_size=batch_size)

            def predict(batch: _Batch) -> _Scores:
                return _Scores(batch.lefts, _predict_scores(predict_batch, batch.pixels, scheme.num_classes))

            def write(item: _Scores | _StripEnd) -> _Written | None:
                if isinstance(item, _Scores):
                    stitcher.add(item.lefts, item.probabilities)
                    return None
                with stitcher.finish(item) as strip:
                    _write_strip(strip, classes_dst, probabilities_dst, confidence_dst, confidence_cells)
                _release_freed_memory()
                return _Written(item.top + item.rows, int(item.valid.sum()))

            stages = _in_threads(image_path, read, predict, write) if pipelined else _in_turn(src, read, predict, write)
            with contextlib.closing(stages):  # a failure here stops the threads before the outputs close
                for written in stages:
                    valid_pixels += written.valid_pixels
                    if progress is not None:
                        progress(written.rows_done, grid.height)
            stitcher.free()  # before the COG copies, which need memory of their own
    return SceneMap(
        classes=Path(out_classes),
        style=style_path(out_classes),
        probabilities=None if probabilities_path is None else Path(probabilities_path),
        confidence=None if confidence_path is None else Path(confidence_path),
        grid=grid,
        valid_pixels=valid_pixels,
    )


def window_batches(
    image_path: str | Path,
    *,
    window: int = 256,
    overlap: int = 64,
    batch_size: int = 8,
    scale: Callable[[np.ndarray], np.ndarray] | None = None,
    bands: Sequence[int] | None = None,
) -> Iterator[np.ndarray]:
    """The scaled batches (B, C, window, window) float32 that `predict_scene` with these settings
    hands `predict_batch`, in the same order, read one strip at a time (to time a network alone)."""
    _check_geometry(window, overlap, batch_size)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), _open_scene(image_path) as src:
        indexes = _band_indexes(src, bands)
        scaling = scale if scale is not None else scene_scaling(src, indexes)
        for item in _read_batches(src, indexes, scaling, window=window, overlap=overlap, batch_size=batch_size):
            if isinstance(item, _Batch):
                yield item.pixels


def _write_strip(
    strip: _Strip,
    classes_dst: DatasetWriter,
    probabilities_dst: DatasetWriter | None,
    confidence_dst: DatasetWriter | None,
    confidence_cells: ConfidenceCells | None,
) -> None:
    """Class ids (argmax, 255 on nodata), probabilities and confidence (the shown class's
    probability; NaN on nodata) of finished rows, each raster in one call for all its bands; the
    confidence also goes to `confidence_cells`."""
    height, width = strip.valid.shape
    rows = Window(0, strip.row, width, height)
    nodata = ~strip.valid
    classes = np.empty((height, width), np.uint8)
    for top in range(0, height, ARGMAX_ROWS):  # argmax's int64 ids a few rows at a time
        classes[top : top + ARGMAX_ROWS] = strip.probabilities[:, top : top + ARGMAX_ROWS].argmax(axis=0)
    classes[nodata] = IGNORE_INDEX
    if confidence_dst is not None or confidence_cells is not None:
        confidence = strip.probabilities.max(axis=0)
        confidence[nodata] = np.nan
        if confidence_dst is not None:
            confidence_dst.write(confidence, 1, window=rows)
        if confidence_cells is not None:
            confidence_cells.add(strip.row, confidence, classes)
    classes_dst.write(classes, 1, window=rows)
    if probabilities_dst is not None:
        np.copyto(strip.probabilities, np.float32(np.nan), where=nodata)  # broadcast over the classes
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
    """Numerically stable softmax over the class axis, float32 (class scores to a `PredictBatch`'s
    probabilities)."""
    shifted = scores.astype(np.float32) - scores.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


# --- the three stages -------------------------------------------------------------------------


def _read_batches(
    src: DatasetReader,
    indexes: list[int],
    scale: Callable[[np.ndarray], np.ndarray],
    *,
    window: int,
    overlap: int,
    batch_size: int,
) -> Iterator[_Batch | _StripEnd]:
    """Read stage: one row of windows (a strip) at a time, its windows in scaled batches, then
    which of its rows no later window touches.

    A tiled scene is read a batch's columns at a time (a 13-band 8192 px strip is 54 MB; a batch's
    columns, 11 MB); a scene stored in rows, whose blocks span its width, a strip at a time, so
    that no row is decompressed once per batch."""
    row_starts = window_starts(src.height, window, overlap)
    col_starts = window_starts(src.width, window, overlap)
    strip_height = min(window, src.height)
    by_batch = src.block_shapes[0][1] < src.width
    for top, next_top in zip(row_starts, [*row_starts[1:], src.height]):
        if by_batch:
            valid = np.empty((strip_height, src.width), bool)
        else:
            pixels, valid = _read_strip(src, indexes, top, strip_height, window)
        for first in range(0, len(col_starts), batch_size):
            lefts = col_starts[first : first + batch_size]
            start = lefts[0] if by_batch else 0
            if by_batch:
                end = min(lefts[-1] + window, src.width)
                pixels, valid[:, start:end] = _read_strip(src, indexes, top, strip_height, window, start, end)
            batch = np.empty((len(lefts), pixels.shape[0], window, window), np.float32)
            for item, left in zip(batch, lefts):  # a window at a time: scaling's temporaries stay small
                item[...] = scale(pixels[:, :, left - start : left - start + window])
            if by_batch:
                del pixels
            yield _Batch(lefts, batch)
            del batch  # not held while the next one is cut
        if not by_batch:
            del pixels  # the next strip is read without this one alive
        yield _StripEnd(top, next_top - top, valid[: next_top - top])


def _predict_scores(predict_batch: PredictBatch, pixels: np.ndarray, num_classes: int) -> np.ndarray:
    """Predict stage: the network's probabilities for a batch, checked for shape (their values
    are checked as they are stitched, in the writer)."""
    probabilities = np.asarray(predict_batch(pixels))
    expected = (pixels.shape[0], num_classes, *pixels.shape[2:])
    if probabilities.shape != expected:
        raise ValueError(
            f"predict_batch returned probabilities of shape {probabilities.shape}; expected {expected} "
            f"(batch, classes of the scheme, height, width)"
        )
    return probabilities


class _Stitcher:
    """Write stage, first half: weighted window probabilities summed into a strip of `window`
    scene rows; `finish` divides out the finished rows and moves the rest up."""

    def __init__(self, num_classes: int, grid: Grid, window: int, overlap: int) -> None:
        self.weights = blend_weights(window, overlap)
        height = min(window, grid.height)
        self.total = np.zeros((num_classes, height, grid.width), np.float32)
        self.weight_sum = np.zeros((height, grid.width), np.float32)

    def free(self) -> None:
        self.total, self.weight_sum = np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), np.float32)

    def add(self, lefts: list[int], probabilities: np.ndarray) -> None:
        """Stitch in a batch's probabilities; a NaN or infinite one is the model's failure, named."""
        if not np.isfinite(probabilities.max(axis=1)).all():  # NaN propagates into the maximum
            raise ValueError("predict_batch returned NaN or infinite probabilities")
        _accumulate(self.total, self.weight_sum, self.weights, lefts, probabilities)

    @contextlib.contextmanager
    def finish(self, end: _StripEnd) -> Iterator[_Strip]:
        """The strip's finished rows, averaged in place (a view of the buffer, valid inside the
        block); then the rest moves up."""
        rows = end.rows
        np.divide(self.total[:, :rows], self.weight_sum[:rows], out=self.total[:, :rows])
        yield _Strip(end.top, self.total[:, :rows], end.valid)
        _shift_up(self.total, rows)
        _shift_up(self.weight_sum, rows)


def _accumulate(
    total: np.ndarray, weight_sum: np.ndarray, weights: np.ndarray, lefts: list[int], probabilities: np.ndarray
) -> None:
    """Add weighted window probabilities into the strip, cropping what lies beyond the scene; the
    probabilities are weighted in their own memory (a `PredictBatch` returns a new array)."""
    height, width = weight_sum.shape
    for left, window_probabilities in zip(lefts, probabilities):
        right = min(left + weights.shape[1], width)
        weight = weights[:height, : right - left]
        weighted = window_probabilities[:, :height, : right - left]
        np.multiply(weighted, weight, out=weighted)
        total[:, :, left:right] += weighted
        weight_sum[:, left:right] += weight


def _read_strip(
    src: DatasetReader,
    indexes: list[int],
    top: int,
    height: int,
    window: int,
    start: int = 0,
    end: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (C, >=window, >=window) of scene rows [top, top + height) and columns [start, end)
    (default: all), zero-padded only when the scene is smaller than a window, and where they hold
    data (`geo.readers.read_valid`), (height, end - start)."""
    width = (src.width if end is None else end) - start
    pixels, valid = read_valid(src, Window(start, top, width, height), indexes)
    if height < window or width < window:
        pixels = np.pad(pixels, ((0, 0), (0, max(0, window - height)), (0, max(0, window - width))))
    return pixels, valid


def _shift_up(array: np.ndarray, rows: int) -> None:
    """Move the not yet finished rows of a strip buffer to its top and clear the rest."""
    keep = array.shape[-2] - rows
    array[..., :keep, :] = array[..., rows:, :]
    array[..., keep:, :] = 0


# --- running the stages -----------------------------------------------------------------------

_Read = Callable[[DatasetReader], Iterator[_Batch | _StripEnd]]
_Predict = Callable[[_Batch], _Scores]
_Write = Callable[[_Scores | _StripEnd], _Written | None]


def _in_turn(src: DatasetReader, read: _Read, predict: _Predict, write: _Write) -> Generator[_Written, None, None]:
    """The stages one after the other in the caller's thread, reading through `src`."""
    for item in read(src):
        written = write(predict(item) if isinstance(item, _Batch) else item)
        if written is not None:
            yield written


class _Stopped(Exception):
    """Raised in a stage's thread when the pipeline stops (another stage failed, or the caller left)."""


_END = object()
"""The last item handed on."""
_EMPTY = object()


class _Pipeline:
    """The first failure of any stage, which stops them all."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self._failure is None and not isinstance(error, _Stopped):
                self._failure = error
        self.stop.set()

    def stopped(self) -> BaseException:
        """What a stage sees once the pipeline stops: the first failure (raised in the caller's
        thread as it was raised), else `_Stopped`."""
        return self._failure if self._failure is not None else _Stopped()

    def start(self, name: str, work: Callable[[], None]) -> threading.Thread:
        """`work` in a daemon thread; what it raises stops the pipeline and is kept for the caller."""

        def run() -> None:
            try:
                work()
            except BaseException as error:  # handed to the caller's thread, raised there
                self.fail(error)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread


class _Handoff:
    """Items from one stage to the next, one at a time: `put` returns once the next stage has taken
    the item, so a stage works at most one item ahead of the next (two items alive per link, the
    least that lets both work at once). Both ends give up when the pipeline stops."""

    def __init__(self, pipeline: _Pipeline) -> None:
        self._pipeline = pipeline
        self._changed = threading.Condition()
        self._item: object = _EMPTY

    def put(self, item: object) -> None:
        with self._changed:
            self._item = item
            self._changed.notify_all()
            while self._item is not _EMPTY:
                self._wait()

    def get(self) -> object:
        with self._changed:
            while self._item is _EMPTY:
                self._wait()
            item, self._item = self._item, _EMPTY
            self._changed.notify_all()
            return item

    def _wait(self) -> None:
        if self._pipeline.stop.is_set():
            raise self._pipeline.stopped()
        self._changed.wait(_POLL_SECONDS)


def _in_threads(
    image_path: str | Path, read: _Read, predict: _Predict, write: _Write
) -> Generator[_Written, None, None]:
    """Read in a reader thread (its own dataset handle), predict in the caller's thread, stitch
    and write in a writer thread; yields in the caller's thread what the writer finished.

    Close the generator (`contextlib.closing`) so the threads stop and are joined even when the
    caller stops early: the writer must be done before the output datasets close.
    """
    pipeline = _Pipeline()
    to_predict, to_write = _Handoff(pipeline), _Handoff(pipeline)
    written: queue.SimpleQueue[_Written] = queue.SimpleQueue()

    caller_env = rasterio.env.getenv() if rasterio.env.hasenv() else {}  # GDAL options, credentials

    # Each stage lets go of an item (`del`) before it waits for the next, so that no batch outlives
    # its use: two batches' pixels and probabilities per link, not three.
    def reader() -> None:
        with rasterio.Env(**caller_env), _open_scene(image_path) as src:
            for item in read(src):
                to_predict.put(item)
                del item
        to_predict.put(_END)

    def writer() -> None:
        while (item := to_write.get()) is not _END:
            done = write(cast("_Scores | _StripEnd", item))
            del item
            if done is not None:
                written.put(done)

    threads = [pipeline.start("predict_scene-read", reader), pipeline.start("predict_scene-write", writer)]
    try:
        while (item := to_predict.get()) is not _END:
            result = predict(item) if isinstance(item, _Batch) else item
            del item
            to_write.put(result)
            del result
            yield from _drain(written)
        to_write.put(_END)
        while threads[1].is_alive():
            threads[1].join(_POLL_SECONDS)
            yield from _drain(written)
        if pipeline.stop.is_set():  # the writer failed on the last items
            raise pipeline.stopped()
        yield from _drain(written)
    finally:
        pipeline.stop.set()
        for thread in threads:
            thread.join()
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Give the C heap's free pages back to the system, after each strip and at the end.

    glibc keeps what a thread frees in that thread's malloc arena, and arrays of up to 32 MiB come
    from arenas once it has freed one that size; three threads churning batches then hold about
    100 MiB more than they use (measured on a 4096 px scene), and the COG copies after them cannot
    reuse it. A no-op where the C library is not glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def _drain(items: queue.SimpleQueue[_Written]) -> Iterator[_Written]:
    while True:
        try:
            yield items.get_nowait()
        except queue.Empty:
            return


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
