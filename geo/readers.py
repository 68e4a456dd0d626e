"""Reading rasters as scaled tiles: windows of a source's files, scaling, nodata.

The layouts themselves (which files, which labels) are `geo.sources`; this module reads what a
source points at. Every problem with a file raises `DataError` naming that file, so ingest can
skip it (or stop, under --strict) and the user learns which file to look at. Reads are windowed:
a tile's pixels are the only pixels in memory, whatever the size of the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Interleaving
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import IGNORE_INDEX, S1_BANDS
from geo.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from geo.sources.base import Source

# DeepGlobe JPEGs carry no georeferencing by design; the index records that instead.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


@dataclass(frozen=True)
class Tile:
    """Scaled pixels of one tile: image float32 (C, H, W); mask uint8 (H, W), 255 = ignore.

    `s1` holds SEN12MS backscatter in dB, float32 (2, H, W), when it was asked for.
    """

    image: np.ndarray
    mask: np.ndarray
    s1: np.ndarray | None = None


@dataclass(frozen=True)
class LocatedTile:
    """A tile with where it lies: its window in the file, and the file's CRS and window bounds."""

    tile: Tile
    window: Window
    crs: CRS | None
    bounds: tuple[float, float, float, float] | None
    """Window bounds (left, bottom, right, top) in `crs`; None when not georeferenced."""
    scaling: Scaling | None = None
    """With `read_tiles(..., as_stored=True)`: what turns `tile.image`, the pixels as stored, into
    the scaled image."""


@dataclass(frozen=True)
class SourceFile:
    """One image of a dataset and what goes with it; `class_id` labels all of a folder patch."""

    path: Path
    label_path: Path | None = None
    s1_path: Path | None = None
    season: str | None = None
    scene: str | None = None
    class_id: int | None = None


def scale_image(
    array: np.ndarray, scales: Sequence[float] | None = None, offsets: Sequence[float] | None = None
) -> np.ndarray:
    """Raw pixels -> model input. uint8 -> [0, 1] by /255; anything else is reflectance x 10000:
    clip to [0, 10000], /10000.

    Bands (axis -3) tagged with a scale/offset other than (1, 0) hold reflectance (0..1)
    as raw * scale + offset: it is rounded to reflectance x 10000 first, so a float32, int16 or
    uint16 scene with such tags gives the model exactly what the equivalent untagged uint16 scene
    gives. NaN and +-inf (nodata) become NaN, not a clipped reflectance (see `finite_pixels`).
    """
    if scales is not None and offsets is not None:
        scale, offset = np.asarray(scales), np.asarray(offsets)
    else:
        scale = offset = np.zeros(0)
    tagged = (scale != 1) | (offset != 0)
    if tagged.any():
        per_band = (len(tagged), 1, 1)
        reflectance = np.round((array * scale.reshape(per_band) + offset.reshape(per_band)) * 10000)
        array = np.where(tagged.reshape(per_band), reflectance, array)  # untagged bands stay as they are
    elif array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    scaled = np.clip(array, 0, 10000).astype(np.float32) / np.float32(10000)
    if np.issubdtype(array.dtype, np.floating):
        scaled[~np.isfinite(array)] = np.nan
    return scaled


@dataclass(frozen=True)
class Scaling:
    """`scale_image` with the scale/offset tags of some bands, in order: a callable that, being
    hashable, lets what depends only on it (ingest's table of scaled values) be computed once."""

    scales: tuple[float, ...]
    offsets: tuple[float, ...]

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return scale_image(array, self.scales, self.offsets)


def scene_scaling(dataset: DatasetReader, indexes: Sequence[int]) -> Scaling:
    """`scale_image` with the scale/offset tags of the bands `indexes` (1-based) of `dataset`, for
    pixels read from those bands in that order."""
    return Scaling(
        scales=tuple(float(dataset.scales[index - 1]) for index in indexes),
        offsets=tuple(float(dataset.offsets[index - 1]) for index in indexes),
    )


def grid_windows(height: int, width: int, grid: int) -> list[Window]:
    """A grid x grid cut of a file, row by row; a remainder of under `grid` pixels is dropped."""
    tile_h, tile_w = height // grid, width // grid
    if tile_h == 0 or tile_w == 0:
        raise ValueError(f"a {height}x{width} image cannot be cut into a {grid}x{grid} grid")
    return [Window(col * tile_w, row * tile_h, tile_w, tile_h) for row in range(grid) for col in range(grid)]


def read_tiles(
    source: Source,
    file: SourceFile,
    *,
    grid: int = 1,
    window: Window | None = None,
    with_s1: bool = False,
    as_stored: bool = False,
) -> Iterator[LocatedTile]:
    """Tiles of one file: the given window, else a grid x grid cut (1 = the whole file).

    The files stay open across the tiles, so a JPEG is not decoded again for every tile.
    `as_stored`: `tile.image` holds the pixels as the file stores them (`read_as_stored`: dtype,
    memory layout) and `LocatedTile.scaling` scales them, for a reader (ingest) that needs less
    than the scaled image.
    """
    with contextlib.ExitStack() as stack:
        image = _open(stack, file.path)
        source.check_image(file.path, image)
        labels = None
        if file.label_path is not None:
            labels = _open_beside(stack, file.path, file.label_path, "label")
            source.check_labels(file, image, labels)
        read_s1: Callable[[Window], np.ndarray] | None = None
        if with_s1 and file.s1_path is not None:
            s1 = _open_beside(stack, file.path, file.s1_path, "s1")
            check_same_size(file.path, image, file.s1_path, s1)
            if s1.count != len(S1_BANDS):
                raise DataError(file.s1_path, f"has {s1.count} bands; SEN12MS s1 has 2 (VV, VH)")
            read_s1 = partial(read_window, s1, file.s1_path)
        try:
            windows = [window] if window is not None else grid_windows(image.height, image.width, grid)
        except ValueError as error:
            raise DataError(file.path, str(error)) from None
        scaling = scene_scaling(image, image.indexes)
        georeferenced = image.crs is not None
        crs = image.crs if georeferenced else None
        for tile_window in windows:
            tile = Tile(
                image=(
                    read_as_stored(image, file.path, tile_window)
                    if as_stored
                    else scaling(read_window(image, file.path, tile_window))
                ),
                mask=source.read_mask(file, labels, tile_window),
                s1=None if read_s1 is None else read_s1(tile_window).astype(np.float32),
            )
            yield LocatedTile(
                tile,
                tile_window,
                crs,
                _bounds(tile_window, image.transform) if georeferenced else None,
                scaling if as_stored else None,
            )


def _bounds(window: Window, transform: Affine) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a window in the grid's CRS."""
    left, top = transform @ (window.col_off, window.row_off)
    right, bottom = transform @ (window.col_off + window.width, window.row_off + window.height)
    return (min(left, right), min(top, bottom), max(left, right), max(top, bottom))


def load_tile(row: pd.Series | Mapping[str, Any], source: Source) -> Tile:
    """The tile of one index row of `source`'s index, read through its window."""
    window = Window(int(row["col_off"]), int(row["row_off"]), int(row["width"]), int(row["height"]))
    label_path = row["label_path"]
    file = SourceFile(
        Path(row["path"]),
        label_path=Path(label_path) if isinstance(label_path, str) and label_path else None,
        class_id=int(row["majority_class"]),
    )
    (located,) = read_tiles(source, file, window=window)
    return _without_non_finite(located.tile)


def _without_non_finite(tile: Tile) -> Tile:
    """A tile to learn from: non-finite pixels (nodata of float products) zeroed and unlabelled."""
    finite = finite_pixels(tile.image)
    if finite.all():
        return tile
    return dataclasses.replace(tile, mask=np.where(finite, tile.mask, IGNORE_INDEX).astype(np.uint8))


def _open(stack: contextlib.ExitStack, path: Path) -> DatasetReader:
    try:
        return stack.enter_context(rasterio.open(path))
    except RasterioError as error:
        raise DataError(path, f"cannot be opened as a raster ({_reason(error)})") from None


def _open_beside(stack: contextlib.ExitStack, image_path: Path, path: Path, role: str) -> DatasetReader:
    """Open the label or s1 file of an image; it must exist."""
    if not path.exists():
        raise DataError(image_path, f"has no {role} file beside it (expected {path})")
    return _open(stack, path)


def check_same_size(image_path: Path, image: DatasetReader, path: Path, partner: DatasetReader) -> None:
    """DataError when the file `path` that goes with an image (its labels, its s1) does not cover
    the image's pixel grid: another width or height."""
    if (partner.height, partner.width) != (image.height, image.width):
        raise DataError(
            path,
            f"is {partner.width}x{partner.height} px but its image {image_path.name} is "
            f"{image.width}x{image.height} px",
        )


def read_window(
    dataset: DatasetReader,
    path: str | Path,
    window: Window,
    indexes: int | Sequence[int] | None = None,
    *,
    boundless: bool = False,
) -> np.ndarray:
    """Raw pixels of a window (`boundless`: beyond the file's edges filled with 0); DataError
    naming `path` where GDAL cannot read them, as in a truncated or corrupt file."""
    with _reading(path):
        if boundless:
            return dataset.read(indexes, window=window, boundless=True, fill_value=0)
        return dataset.read(indexes, window=window)


def read_as_stored(dataset: DatasetReader, path: str | Path, window: Window) -> np.ndarray:
    """All bands of a window, raw, in one read: (C, H, W) laid out in memory as the file stores
    them, so GDAL copies whole pixels rather than gathering them band by band: a pixel-interleaved
    file (GeoTIFF's default, SEN12MS) gives a (C, H, W) view of (H, W, C) memory. Under
    `BULK_READS` an uncompressed GeoTIFF is read straight from the mapped file, not block by
    block through GDAL's cache (a SEN12MS patch has one block per band and row). DataError naming
    `path` where GDAL cannot read them."""
    out = None
    if dataset.count > 1 and dataset.interleaving == Interleaving.pixel and len(set(dataset.dtypes)) == 1:
        height, width = int(window.height), int(window.width)
        out = np.empty((height, width, dataset.count), dataset.dtypes[0]).transpose(2, 0, 1)
    with _reading(path):
        return dataset.read(window=window, out=out)


BULK_READS: Mapping[str, str] = {"GTIFF_VIRTUAL_MEM_IO": "IF_ENOUGH_RAM", "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE"}
"""GDAL settings (`rasterio.Env(**BULK_READS)`) for reading many files whole, as ingest does: an
uncompressed GeoTIFF window is copied from the memory-mapped file (where GDAL sees that the file
holds every block: a truncated file fails as without it) rather than block by block through
GDAL's cache, and opening a file probes its own sidecar files (.aux.xml, .msk, .ovr) instead of
listing its folder, which for SEN12MS holds every patch of a scene."""


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[None]:
    """GDAL's read errors as a DataError naming the file."""
    try:
        yield
    except RasterioError as error:
        raise DataError(path, f"cannot be read, truncated or corrupt? ({_reason(error)})") from None


def finite_pixels(pixels: np.ndarray) -> np.ndarray:
    """Where every band of (C, H, W) pixels is finite, (H, W). NaN and +-inf are how many float
    products mark missing data: those pixels are set to 0 in place, as padding is, so that a NaN
    cannot spread through a network's convolutions and normalisation into its neighbours."""
    if not np.issubdtype(pixels.dtype, np.floating):
        return np.ones(pixels.shape[1:], dtype=bool)
    finite = np.isfinite(pixels).all(axis=0)
    pixels[:, ~finite] = 0
    return finite


def read_valid(dataset: DatasetReader, window: Window, indexes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels of the bands `indexes` in `window` (non-finite pixels zeroed) and where they hold
    data (H, W): the dataset mask (some band is not nodata) and every band read finite."""
    pixels = read_window(dataset, dataset.name, window, indexes)
    finite = finite_pixels(pixels)
    with _reading(dataset.name):
        mask = dataset.dataset_mask(window=window) > 0
    return pixels, mask & finite


def has_data(dataset: DatasetReader, indexes: Sequence[int], rows: int = 256) -> bool:
    """Whether any pixel holds data (see `read_valid`), read `rows` rows at a time and stopping at
    the first that do: an empty scene is found before any work, and a scene with data costs a strip."""
    for top in range(0, dataset.height, rows):
        window = Window(0, top, dataset.width, min(rows, dataset.height - top))
        if read_valid(dataset, window, indexes)[1].any():
            return True
    return False


def _reason(error: Exception) -> str:
    """GDAL's own message: rasterio often puts it in the cause ("See previous exception")."""
    return str(error.__cause__ or error)
