"""The tile index: one GeoParquet row per patch or tile, with what later steps need of its pixels.

Columns and metadata follow ARCHITECTURE.md. Building it streams: each worker holds one tile's
pixels at a time, read in one go as the file stores them and summarised from per-band histograms
(`stored_band_statistics`), and the per-band statistics computed here let KMeans regions work
without reading pixels again. The workers are processes where fork is cheap and safe (Linux):
opening a GeoTIFF (its CRS) and counting pixels hold the GIL, so threads would share one core. A
bad file is recorded with its reason and left out; the caller decides whether that is fatal.

The steps are separate so a Prefect/Dask flow can spread them: `discover` the files,
`index_file` each one anywhere, `assemble` the parts, `write_index`.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, TypeVar

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.warp import transform_bounds
from shapely.geometry import box

from geo.atomic import atomic_output
from geo.classes import IGNORE_INDEX
from geo.errors import DataError
from geo.progress import progress_bar
from geo.readers import BULK_READS, LocatedTile, Scaling, SourceFile, read_tiles
from geo.sources import as_source
from geo.sources.base import Dataset, Source

COLUMNS: tuple[str, ...] = (
    "path",
    "label_path",
    "s1_path",
    "source",
    "season",
    "scene",
    "crs",
    "row_off",
    "col_off",
    "width",
    "height",
    "class_counts",
    "majority_class",
    "features",
    "geometry",
)
STATISTICS: tuple[str, ...] = ("mean", "std", "q10", "q50", "q90")
"""Per-band statistics in `features`, band by band."""
QUANTILES = np.array([0.1, 0.5, 0.9])
"""The quantiles among the STATISTICS."""
PATH_COLUMNS: tuple[str, ...] = ("path", "label_path", "s1_path")
"""Columns of file paths: stored relative to the dataset root, read back absolute."""
METADATA_KEY = b"landcover"
METADATA_KEYS: tuple[str, ...] = ("source", "scheme", "bands", "feature_names")
"""Metadata every step reads; an index without them was not written by `landcover ingest`."""
FOOTPRINT_CRS = "EPSG:4326"


@dataclass(frozen=True)
class Skipped:
    """A file left out of the index, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class FileIndex:
    """The rows of one file, or why it has none."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: Skipped | None = None


@dataclass(frozen=True)
class IndexResult:
    frame: gpd.GeoDataFrame
    skipped: list[Skipped]
    metadata: dict[str, Any]


def feature_names(bands: Iterable[str]) -> list[str]:
    return [f"{band}_{statistic}" for band in bands for statistic in STATISTICS]


def band_statistics(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> C x (mean, std, q10, q50, q90), flattened band by band, of each band's finite
    pixels (NaN and +-inf are nodata; each band needs one finite pixel).

    Quantiles as np.quantile's default (linear) computes them, from one sort per band: on
    quantised reflectance np.partition degrades and is four times slower than sorting.
    """
    values = image.reshape(image.shape[0], -1)
    finite = np.isfinite(values)
    pixels = np.sort(values if finite.all() else np.where(finite, values, np.nan), axis=1)  # NaN last
    return np.concatenate([_statistics(band[:count]) for band, count in zip(pixels, finite.sum(axis=1))])


def _statistics(values: np.ndarray) -> np.ndarray:
    """Mean, std, q10, q50, q90 of sorted values."""
    position = QUANTILES * (len(values) - 1)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, len(values) - 1)
    lower = values[below].astype(np.float64)
    quantiles = lower + (position - below) * (values[above] - lower)
    return np.array([values.mean(dtype=np.float64), values.std(dtype=np.float64), *quantiles])


def stored_band_statistics(pixels: np.ndarray, scaling: Scaling) -> np.ndarray | None:
    """`band_statistics(scaling(pixels))` from (C, H, W) pixels as stored, without scaling or
    sorting them: for 8- and 16-bit integers (every pixel finite), from each band's histogram of
    stored values and the table of what each value scales to (`_value_table`, once per scaling).
    The quantiles are np.quantile's (linear) of the scaled pixels exactly; mean and std agree to
    float64 rounding. None for other pixels (floats: NaN is nodata; wider integers)."""
    table = _value_table(pixels.dtype, scaling, pixels.shape[0])
    if table is None:
        return None
    codes = _codes(pixels).reshape(len(pixels), -1)  # band by band: one copy of an interleaved read
    count = codes.shape[1]
    position = QUANTILES * (count - 1)
    below = np.floor(position)
    above = np.minimum(below + 1, count - 1)
    statistics = np.empty((len(codes), len(STATISTICS)))
    for band, (band_codes, values, order) in enumerate(zip(codes, table.values, table.orders)):
        if order is None:  # values rise with codes: the histogram from the lowest code present
            counts = np.bincount(band_codes)
            lowest = int(np.flatnonzero(counts)[0])
            counts, values = counts[lowest:], values[lowest : len(counts)]
        else:
            counts = np.bincount(band_codes, minlength=len(values))[order]
            values = values[order]
        # the k-th smallest scaled pixel is the value of the first code whose cumulative count exceeds k
        ends = np.cumsum(counts)
        lower = values[np.searchsorted(ends, below, side="right")]
        upper = values[np.searchsorted(ends, above, side="right")]
        mean = counts @ values / count
        statistics[band] = (
            mean,
            np.sqrt(counts @ np.square(values - mean) / count),
            *(lower + (position - below) * (upper - lower)),
        )
    return statistics.ravel()


@dataclass(frozen=True)
class _ValueTable:
    """Per band, the scaled value (float32, held as float64) of every stored code, and the codes'
    order by scaled value (None where it is their own order, as in untagged bands)."""

    values: np.ndarray
    orders: list[np.ndarray | None]


def _codes(pixels: np.ndarray) -> np.ndarray:
    """8- or 16-bit integers (native byte order) as unsigned codes in the order of their values:
    signed ones with the sign bit flipped. Its own inverse, viewed back as the signed type."""
    unsigned = pixels.view(f"u{pixels.dtype.itemsize}")
    if pixels.dtype.kind != "i":
        return unsigned
    return unsigned ^ unsigned.dtype.type(1 << (8 * pixels.dtype.itemsize - 1))


@lru_cache(maxsize=4)
def _value_table(dtype: np.dtype, scaling: Scaling, bands: int) -> _ValueTable | None:
    """What each code of `dtype` scales to in each band, through the same `scaling` as the pixels
    (so every scale/offset tag and clip is as `scale_image` does it); None where some code scales
    to a non-finite value."""
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        return None
    codes = np.arange(1 << (8 * dtype.itemsize)).astype(f"u{dtype.itemsize}")
    stored = _codes(codes.view(dtype)).view(dtype)
    values = scaling(np.broadcast_to(stored, (bands, 1, len(stored)))).reshape(bands, -1)
    if not np.isfinite(values).all():
        return None
    orders = [None if (np.diff(band) >= 0).all() else np.argsort(band, kind="stable") for band in values]
    return _ValueTable(values.astype(np.float64), orders)


def index_file(source: Source, file: SourceFile, *, grid: int, num_classes: int) -> FileIndex:
    """Read one file tile by tile into index rows; a DataError becomes a Skipped entry."""
    try:
        with rasterio.Env(**BULK_READS):
            tiles = read_tiles(source, file, grid=grid if source.cut_into_grid else 1, as_stored=True)
            return FileIndex(rows=[_row(source, file, located, num_classes) for located in tiles])
    except DataError as error:
        return FileIndex(skipped=Skipped(error.path, error.problem))


def _row(source: Source, file: SourceFile, located: LocatedTile, num_classes: int) -> dict[str, Any]:
    """A tile's row; pixels not finite in some band (NaN, +-inf: nodata) count in no statistic.

    `located` holds the pixels as stored (`read_tiles(as_stored=True)`): integer pixels are
    summarised from their histograms, others scaled first.
    """
    pixels, mask, window = located.tile.image, located.tile.mask, located.window
    features = None if located.scaling is None else stored_band_statistics(pixels, located.scaling)
    if features is not None:  # 8- or 16-bit integers: every pixel is finite
        counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]  # IGNORE_INDEX lies past the classes
    else:
        image = pixels if located.scaling is None else located.scaling(pixels)
        finite = np.isfinite(image)
        empty = np.flatnonzero(~finite.any(axis=(1, 2))) + 1
        if len(empty):
            raise DataError(
                file.path,
                f"band(s) {', '.join(map(str, empty))} hold no finite pixel (all NaN or +-inf): nothing to index",
            )
        labelled = (mask != IGNORE_INDEX) & finite.all(axis=0)
        features = band_statistics(image)
        counts = np.bincount(mask[labelled], minlength=num_classes)[:num_classes]
    if located.crs is None or located.bounds is None:  # not georeferenced: a box in pixel space (x = column, y = row)
        footprint = box(
            window.col_off,
            window.row_off,
            window.col_off + window.width,
            window.row_off + window.height,
        )
    else:
        footprint = box(*transform_bounds(located.crs, FOOTPRINT_CRS, *located.bounds))
    return {
        "path": str(file.path),
        "label_path": _text(file.label_path),
        "s1_path": _text(file.s1_path),
        "source": source.name,
        "season": file.season,
        "scene": file.scene,
        "crs": located.crs.to_string() if located.crs is not None else None,
        "row_off": int(window.row_off),
        "col_off": int(window.col_off),
        "width": int(window.width),
        "height": int(window.height),
        "class_counts": counts.tolist(),
        "majority_class": int(counts.argmax()) if counts.sum() else -1,
        "features": features.tolist(),
        "geometry": footprint,
    }


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def assemble(dataset: Dataset, parts: Iterable[FileIndex], *, grid: int) -> IndexResult:
    """Rows of all files in order; files whose band count differs from the rest join the skipped."""
    parts = list(parts)
    skipped = [Skipped(error.path, error.problem) for error in dataset.problems]
    skipped += [part.skipped for part in parts if part.skipped is not None]
    readable = [part for part in parts if part.rows]
    if not readable:
        first = f"{skipped[0].path}: {skipped[0].reason}" if skipped else "none"
        raise DataError(dataset.root, f"no readable tiles in {len(dataset.files)} files; first problem: {first}")
    count = Counter(map(_band_count, readable)).most_common(1)[0][0]
    rows = [row for part in readable if _band_count(part) == count for row in part.rows]
    skipped += [
        Skipped(part.rows[0]["path"], f"has {_band_count(part)} bands; the other images have {count}")
        for part in readable
        if _band_count(part) != count
    ]
    skipped.sort(key=lambda entry: entry.path)
    bands = dataset.source.band_names(count)
    pixel_footprints = all(row["crs"] is None for row in rows)
    frame = gpd.GeoDataFrame(
        rows,
        columns=list(COLUMNS),
        geometry="geometry",
        crs=None if pixel_footprints else FOOTPRINT_CRS,
    )
    metadata = {
        "source": dataset.source.name,
        "source_settings": dataset.source.settings(),
        "root": str(dataset.root),
        "scheme": {
            "name": dataset.scheme.name,
            "names": list(dataset.scheme.names),
            "colors": [list(colour) for colour in dataset.scheme.colors],
        },
        "bands": list(bands),
        "feature_names": feature_names(bands),
        "pixel_footprints": pixel_footprints,
        "grid": grid if dataset.source.cut_into_grid else 1,
        "skipped": [{"path": entry.path, "reason": entry.reason} for entry in skipped],
    }
    return IndexResult(frame, skipped, metadata)


def _band_count(part: FileIndex) -> int:
    return len(part.rows[0]["features"]) // len(STATISTICS)


def build_index(
    source: Source | str,
    root: str | Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    grid: int = 4,
) -> IndexResult:
    """Index every file of a dataset with `workers` parallel readers (default: one per core, at
    most 8; see `reader_pool`); rows come in sorted-path order whatever their number.

    `grid` cuts each image of a source that is cut into grid x grid tiles (DeepGlobe, pairs); the
    others are one tile per file.
    """
    if grid < 1:
        raise ValueError(f"grid must be at least 1, not {grid}")
    source = as_source(source)
    dataset = source.discover(Path(root).resolve())
    work = partial(index_file, source, grid=grid, num_classes=dataset.scheme.num_classes)
    workers = workers or min(8, os.cpu_count() or 1)
    with (
        reader_pool(workers, len(dataset.files)) as pool,
        progress_bar(len(dataset.files), f"ingest {source.name}", unit="files", enabled=progress) as bar,
    ):
        parts = []
        for part in pool.map(work, dataset.files, chunksize=max(1, min(8, len(dataset.files) // (4 * workers)))):
            parts.append(part)
            bar.update()
    return assemble(dataset, parts, grid=grid)


T = TypeVar("T")


def reader_pool(workers: int, files: int) -> Executor:
    """Where `build_index` reads `files` files with `workers` workers: in this process for one,
    else a pool of processes forked from this one on Linux (the results are small rows), threads
    elsewhere (spawning a process costs seconds of imports)."""
    if workers <= 1 or files <= 1:
        return _InProcess()
    if sys.platform == "linux":
        return ProcessPoolExecutor(max_workers=min(workers, files), mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(max_workers=workers)


class _InProcess(Executor):
    """An executor that runs the work here, lazily and in order, when it is asked for."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future

    def map(
        self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[T]:
        return map(fn, *iterables)


def write_index(frame: gpd.GeoDataFrame, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write the index as GeoParquet with `metadata` as JSON under the parquet key `landcover`.

    Atomic: readers never see a half-written index. Columns that are all null are stored as
    strings so the schema does not depend on the data (e.g. no s1 files). File paths under the
    dataset root (metadata `root`) are stored relative to it, and the root also relative to the
    index's folder (`root_from_index`), so a dataset moved together with its index, or an index
    read with another root (`read_index(path, root)`), still finds its files.
    """
    path = Path(path)
    if metadata.get("root"):
        root = Path(metadata["root"])
        frame = frame.assign(**{column: frame[column].map(partial(_relative, root)) for column in PATH_COLUMNS})
        metadata = {
            **metadata,
            "root_from_index": Path(os.path.relpath(root.resolve(), path.parent.resolve())).as_posix(),
        }
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    table = pq.read_table(pa.BufferReader(buffer.getvalue()))
    for position, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(position, column.name, table.column(position).cast(pa.string()))
    schema_metadata = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()}
    with atomic_output(path) as tmp:
        pq.write_table(table.replace_schema_metadata(schema_metadata), tmp)
    return path


def _relative(root: Path, value: object) -> object:
    """A file path as stored: relative to the root (POSIX separators) when it lies under it."""
    if not isinstance(value, str) or not value:
        return value
    try:
        return Path(value).relative_to(root).as_posix()
    except ValueError:
        return value


def read_index(path: str | Path, root: str | Path | None = None) -> tuple[gpd.GeoDataFrame, dict[str, Any]]:
    """The index frame (file paths absolute) and its metadata; DataError when the file is missing
    or not an index.

    The dataset root is `root` when given (a moved dataset, a shared index), else the recorded
    root, else, when that folder is gone, the root recorded relative to the index's folder (the
    dataset moved together with its index); metadata `root` says which was used.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such index file")
    try:
        frame = gpd.read_parquet(path)
        schema_metadata = pq.read_schema(path).metadata or {}
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DataError(path, f"is not a GeoParquet tile index ({error})") from None
    if METADATA_KEY not in schema_metadata:
        raise DataError(path, "has no landcover metadata; write it with `landcover ingest`")
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise DataError(path, f"is not a landcover tile index: no column(s) {', '.join(missing)}")
    try:
        metadata = json.loads(schema_metadata[METADATA_KEY])
    except ValueError as error:
        raise DataError(path, f"has unreadable landcover metadata ({error})") from None
    absent = [key for key in METADATA_KEYS if not isinstance(metadata, dict) or key not in metadata]
    if absent:
        raise DataError(path, f"has landcover metadata without {', '.join(absent)}; write it with `landcover ingest`")
    dataset_root = _dataset_root(path, metadata, root)
    if dataset_root is not None:
        metadata["root"] = str(dataset_root)
        for column in PATH_COLUMNS:
            frame[column] = frame[column].map(partial(_absolute, dataset_root))
    return frame, metadata


def _dataset_root(index: Path, metadata: Mapping[str, Any], root: str | Path | None) -> Path | None:
    """The folder the index's relative paths start from (None: an index of absolute paths)."""
    if root is not None:
        if not Path(root).is_dir():
            raise DataError(root, "no such folder (--root names the dataset's root folder)")
        return Path(root).resolve()
    if not metadata.get("root"):
        return None
    recorded = Path(metadata["root"])
    beside_index = index.parent / metadata.get("root_from_index", recorded)
    if not recorded.is_dir() and beside_index.is_dir():
        return beside_index.resolve()
    return recorded


def _absolute(root: Path, value: object) -> object:
    return str(root / value) if isinstance(value, str) and value else value
