"""Readers of the supported dataset layouts: find the files, read windows of them as scaled tiles.

Every problem with a file raises `DataError` naming that file, so ingest can skip it (or stop,
under --strict) and the user learns which file to look at. Reads are windowed: a tile's pixels
are the only pixels in memory, whatever the size of the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import (
    DEEPGLOBE,
    DEEPGLOBE_UNKNOWN_COLOR,
    DFC10,
    IGBP_TO_DFC10,
    IGNORE_INDEX,
    RGB_BANDS,
    S1_BANDS,
    S2_BANDS,
    ClassScheme,
    folder_scheme,
)
from geo.errors import DataError

SOURCES = ("sen12ms", "deepglobe", "folder")
FOLDER_SUFFIXES = (".tif", ".tiff")

DEEPGLOBE_FAR = 64
"""A mask channel this far from both 0 and 255 is ambiguous, not a jittered class colour."""
DEEPGLOBE_MAX_FAR_SHARE = 0.01
"""Share of ambiguous mask pixels above which a mask is rejected as not a DeepGlobe mask."""

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


@dataclass(frozen=True)
class SourceFile:
    """One image of a dataset and what goes with it; `class_id` labels all of a folder patch."""

    path: Path
    label_path: Path | None = None
    s1_path: Path | None = None
    season: str | None = None
    scene: str | None = None
    class_id: int | None = None


@dataclass(frozen=True)
class Dataset:
    """The files of one dataset, its class scheme, and problems found while listing it."""

    source: str
    root: Path
    scheme: ClassScheme
    files: list[SourceFile]
    problems: list[DataError] = field(default_factory=list)


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
    tagged = (
        (np.asarray(scales) != 1) | (np.asarray(offsets) != 0)
        if scales is not None and offsets is not None else np.zeros(0, dtype=bool)
    )
    if tagged.any():
        per_band = (len(tagged), 1, 1)
        reflectance = np.round((array * np.reshape(scales, per_band) + np.reshape(offsets, per_band)) * 10000)
        array = np.where(tagged.reshape(per_band), reflectance, array)  # untagged bands stay as they are
    elif array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    scaled = np.clip(array, 0, 10000).astype(np.float32) / np.float32(10000)
    if np.issubdtype(array.dtype, np.floating):
        scaled[~np.isfinite(array)] = np.nan
    return scaled


def scene_scaling(dataset: DatasetReader, indexes: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """`scale_image` with the scale/offset tags of the bands `indexes` (1-based) of `dataset`, for
    pixels read from those bands in that order."""
    return partial(
        scale_image,
        scales=[dataset.scales[index - 1] for index in indexes],
        offsets=[dataset.offsets[index - 1] for index in indexes],
    )


def band_names(source: str, count: int) -> tuple[str, ...]:
    """Names of a dataset's image bands: S2 for 13 bands, RGB for 3, else band1..bandN."""
    if source == "sen12ms" or count == len(S2_BANDS):
        return S2_BANDS
    if source == "deepglobe" or count == len(RGB_BANDS):
        return RGB_BANDS
    return tuple(f"band{number}" for number in range(1, count + 1))


# --- finding the files of each layout -------------------------------------------------------


def discover(source: str, root: str | Path) -> Dataset:
    """List a dataset's files in sorted order; DataError when the root holds none of the layout."""
    root = Path(root)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if root.is_file():
        raise DataError(root, "is a file, not a folder")
    if not root.is_dir():
        raise DataError(root, "no such folder")
    return {
        "sen12ms": _discover_sen12ms,
        "deepglobe": _discover_deepglobe,
        "folder": _discover_folder,
    }[source](root)


def _discover_sen12ms(root: Path) -> Dataset:
    files = []
    for s2 in sorted(root.glob("ROIs*/s2_*/*.tif")):
        season, scene = s2.parent.parent.name, s2.parent.name.removeprefix("s2_")
        s1 = _sen12ms_partner(s2, "s1")
        files.append(
            SourceFile(s2, _sen12ms_partner(s2, "lc"), s1 if s1.exists() else None, season, scene)
        )
    if not files:
        raise DataError(
            root, "no SEN12MS patches (expected ROIs*/s2_<scene>/<season>_s2_<scene>_p<n>.tif)"
        )
    return Dataset("sen12ms", root, DFC10, files)


def _sen12ms_partner(s2: Path, kind: str) -> Path:
    """The s1 or lc file of an s2 patch: folder `<kind>_<scene>`, `_<kind>_` in the name."""
    folder = s2.parent.with_name(kind + s2.parent.name.removeprefix("s2"))
    return folder / s2.name.replace("_s2_", f"_{kind}_")


def _discover_deepglobe(root: Path) -> Dataset:
    files = [
        SourceFile(
            sat,
            sat.with_name(sat.name.removesuffix("_sat.jpg") + "_mask.png"),
            scene=sat.name.removesuffix("_sat.jpg"),
        )
        for sat in sorted(root.rglob("*_sat.jpg"))
    ]
    if not files:
        raise DataError(root, "no DeepGlobe images (expected <id>_sat.jpg beside <id>_mask.png)")
    return Dataset("deepglobe", root, DEEPGLOBE, files)


def _discover_folder(root: Path) -> Dataset:
    """Class folders with patches make the scheme; an empty class folder is a problem of its own."""
    patches: dict[str, list[Path]] = {}
    problems = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in FOLDER_SUFFIXES)
        if found:
            patches[folder.name] = found
        else:
            problems.append(DataError(folder, "class folder holds no .tif patches"))
    if not patches:
        raise DataError(
            root, "no class folders with .tif patches (expected <root>/<ClassName>/*.tif)"
        )
    scheme = folder_scheme(list(patches))
    files = [
        SourceFile(path, class_id=scheme.names.index(name))
        for name in scheme.names
        for path in patches[name]
    ]
    return Dataset("folder", root, scheme, files, problems)


# --- reading windows ------------------------------------------------------------------------


def grid_windows(height: int, width: int, grid: int) -> list[Window]:
    """A grid x grid cut of a file, row by row; a remainder of under `grid` pixels is dropped."""
    tile_h, tile_w = height // grid, width // grid
    if tile_h == 0 or tile_w == 0:
        raise ValueError(f"a {height}x{width} image cannot be cut into a {grid}x{grid} grid")
    return [
        Window(col * tile_w, row * tile_h, tile_w, tile_h)
        for row in range(grid)
        for col in range(grid)
    ]


def read_tiles(
    source: str,
    file: SourceFile,
    *,
    grid: int = 1,
    window: Window | None = None,
    with_s1: bool = False,
) -> Iterator[LocatedTile]:
    """Tiles of one file: the given window, else a grid x grid cut (1 = the whole file).

    The files stay open across the tiles, so a JPEG is not decoded again for every tile.
    """
    with contextlib.ExitStack() as stack:
        image = _open(stack, file.path)
        _check_image(source, file.path, image)
        labels = _open_partner(stack, file.path, file.label_path, image, "label")
        s1 = _open_partner(stack, file.path, file.s1_path if with_s1 else None, image, "s1")
        if s1 is not None and s1.count != len(S1_BANDS):
            raise DataError(file.s1_path, f"has {s1.count} bands; SEN12MS s1 has 2 (VV, VH)")
        try:
            windows = (
                [window] if window is not None else grid_windows(image.height, image.width, grid)
            )
        except ValueError as error:
            raise DataError(file.path, str(error)) from None
        scaling = scene_scaling(image, image.indexes)
        for tile_window in windows:
            tile = Tile(
                image=scaling(read_window(image, file.path, tile_window)),
                mask=_mask(source, file, labels, tile_window),
                s1=None if s1 is None else read_window(s1, file.s1_path, tile_window).astype(np.float32),
            )
            georeferenced = image.crs is not None
            yield LocatedTile(
                tile,
                tile_window,
                image.crs if georeferenced else None,
                _bounds(tile_window, image.transform) if georeferenced else None,
            )


def _bounds(window: Window, transform: Affine) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a window in the grid's CRS."""
    left, top = transform @ (window.col_off, window.row_off)
    right, bottom = transform @ (window.col_off + window.width, window.row_off + window.height)
    return (min(left, right), min(top, bottom), max(left, right), max(top, bottom))


def load_tile(row: Mapping[str, Any]) -> Tile:
    """The tile of one index row (any source), read through its window."""
    window = Window(int(row["col_off"]), int(row["row_off"]), int(row["width"]), int(row["height"]))
    label_path = row["label_path"]
    file = SourceFile(
        Path(row["path"]),
        label_path=Path(label_path) if isinstance(label_path, str) and label_path else None,
        class_id=int(row["majority_class"]),
    )
    (located,) = read_tiles(str(row["source"]), file, window=window)
    return _without_non_finite(located.tile)


def _without_non_finite(tile: Tile) -> Tile:
    """A tile to learn from: non-finite pixels (nodata of float products) zeroed and unlabelled."""
    finite = finite_pixels(tile.image)
    if finite.all():
        return tile
    return dataclasses.replace(tile, mask=np.where(finite, tile.mask, IGNORE_INDEX).astype(np.uint8))


def read_sen12ms(
    s2_path: str | Path,
    lc_path: str | Path,
    s1_path: str | Path | None = None,
    window: Window | None = None,
) -> Tile:
    """One SEN12MS patch: s2 scaled, lc band 1 (IGBP) as DFC-10 ids, s1 in dB when given."""
    file = SourceFile(Path(s2_path), Path(lc_path), Path(s1_path) if s1_path else None)
    return _one("sen12ms", file, window, with_s1=s1_path is not None)


def read_deepglobe(
    sat_path: str | Path, mask_path: str | Path, window: Window | None = None
) -> Tile:
    """A DeepGlobe image (or a window of it) with its mask decoded to DEEPGLOBE ids."""
    return _one("deepglobe", SourceFile(Path(sat_path), Path(mask_path)), window)


def read_folder_patch(path: str | Path, class_id: int, window: Window | None = None) -> Tile:
    """A class-folder patch: the mask is its folder's class everywhere."""
    return _one("folder", SourceFile(Path(path), class_id=class_id), window)


def _one(source: str, file: SourceFile, window: Window | None, *, with_s1: bool = False) -> Tile:
    (located,) = read_tiles(source, file, window=window, with_s1=with_s1)
    return located.tile


def _open(stack: contextlib.ExitStack, path: Path) -> DatasetReader:
    try:
        return stack.enter_context(rasterio.open(path))
    except RasterioError as error:
        raise DataError(path, f"cannot be opened as a raster ({_reason(error)})") from None


def _open_partner(
    stack: contextlib.ExitStack,
    image_path: Path,
    path: Path | None,
    image: DatasetReader,
    role: str,
) -> DatasetReader | None:
    """Open the label or s1 file of an image; it must exist and cover the same pixel grid."""
    if path is None:
        return None
    if not path.exists():
        raise DataError(image_path, f"has no {role} file beside it (expected {path})")
    partner = _open(stack, path)
    if (partner.height, partner.width) != (image.height, image.width):
        raise DataError(
            path,
            f"is {partner.width}x{partner.height} px but its image {image_path.name} is "
            f"{image.width}x{image.height} px",
        )
    return partner


def _check_image(source: str, path: Path, image: DatasetReader) -> None:
    if source == "sen12ms" and image.count != len(S2_BANDS):
        raise DataError(
            path, f"has {image.count} bands; SEN12MS s2 patches have 13 ({', '.join(S2_BANDS)})"
        )
    if source == "deepglobe" and image.count != len(RGB_BANDS):
        raise DataError(path, f"has {image.count} bands; DeepGlobe images are RGB")
    if source != "deepglobe" and image.crs is None:
        raise DataError(path, "has no CRS; SEN12MS and class-folder patches must be georeferenced")


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


def _mask(
    source: str, file: SourceFile, labels: DatasetReader | None, window: Window
) -> np.ndarray:
    """The class ids of a window: IGBP -> DFC-10, DeepGlobe colours -> ids, or the folder class."""
    if source == "folder":
        return np.full((window.height, window.width), file.class_id, dtype=np.uint8)
    if labels is None or file.label_path is None:
        raise DataError(file.path, f"a {source} image needs a label file")
    if source == "sen12ms":
        igbp = read_window(labels, file.label_path, window, 1)
        return IGBP_TO_DFC10[np.minimum(igbp, IGNORE_INDEX)]
    if labels.count < 3:
        raise DataError(file.label_path, f"has {labels.count} bands; DeepGlobe masks are RGB")
    return decode_deepglobe_mask(read_window(labels, file.label_path, window, [1, 2, 3]), file.label_path)


def _deepglobe_lookup() -> np.ndarray:
    """Class id of each thresholded colour code r*4 + g*2 + b; -1 for a colour of no class."""
    lookup = np.full(8, -1, dtype=np.int16)
    for class_id, colour in enumerate(DEEPGLOBE.colors):
        lookup[_colour_code(colour)] = class_id
    lookup[_colour_code(DEEPGLOBE_UNKNOWN_COLOR)] = IGNORE_INDEX
    return lookup


def _colour_code(colour: tuple[int, int, int]) -> int:
    red, green, blue = (int(value >= 128) for value in colour)
    return red * 4 + green * 2 + blue


_DEEPGLOBE_LOOKUP = _deepglobe_lookup()


def decode_deepglobe_mask(rgb: np.ndarray, path: str | Path) -> np.ndarray:
    """(3, H, W) mask colours -> DEEPGLOBE ids (Unknown -> 255), thresholding each channel at 128
    as the release's impure colours need; DataError for colours that match no class."""
    high = rgb >= 128
    codes = high[0] * 4 + high[1] * 2 + high[2]
    ids = _DEEPGLOBE_LOOKUP[codes]
    wrong = ids < 0
    if wrong.any():
        row, col = np.argwhere(wrong)[0]
        raise DataError(
            path,
            f"{int(wrong.sum())} pixels have a colour that is no DeepGlobe class, e.g. "
            f"{tuple(int(v) for v in rgb[:, row, col])} at row {row}, column {col}",
        )
    distance = np.abs(rgb.astype(np.int16) - np.where(high, 255, 0)).max(axis=0)
    far_share = float((distance >= DEEPGLOBE_FAR).mean())
    if far_share > DEEPGLOBE_MAX_FAR_SHARE:
        raise DataError(
            path,
            f"{far_share:.1%} of pixels are far from every DeepGlobe class colour; "
            "is this a DeepGlobe mask?",
        )
    return ids.astype(np.uint8)
