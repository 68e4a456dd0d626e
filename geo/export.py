"""GIS-ready writers: class-map COGs with colours and names, QGIS styles, probabilities, polygons.

Every output goes through `atomic_output`. rasterio's COG driver is create-copy only, so rasters are
filled window by window into a staging GTiff beside the output, then copied to a COG (GDAL builds
the overviews reading the staging file in blocks, so memory stays bounded whatever the size).
Images without georeferencing (DeepGlobe) are written in pixel coordinates; `Grid.georeferenced`
tells the caller so it can say so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import shapes
from rasterio.io import DatasetReader, DatasetWriter

from geo.atomic import atomic_output, pending, scratch_file
from geo.classes import IGNORE_INDEX, ClassScheme
from geo.errors import DataError

CLASS_NAMES_TAG = "CLASS_NAMES"
"""Dataset tag holding the class names as a JSON list, class id = position."""
CLASS_SCHEME_TAG = "CLASS_SCHEME"
GDAL_CACHE_BYTES = 32 * 2**20
"""GDAL's block cache defaults to 5% of RAM; a fixed cap keeps memory independent of the machine."""
COG_BLOCKSIZE = 512
STAGING_BLOCK_ROWS = 16
POLYGON_CHUNK = 50_000
"""Polygons turned into shapely geometries and appended to the GeoPackage at a time."""
UNGEOREFERENCED_VECTOR_TRANSFORM = Affine(1, 0, 0, 0, -1, 0)
"""QGIS shows an image without a geotransform with y = -row, so vectors over it use that too."""


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a scene: every output of the scene is written on exactly this grid."""

    width: int
    height: int
    crs: CRS | None
    transform: Affine

    @classmethod
    def of(cls, dataset: DatasetReader) -> Grid:
        return cls(dataset.width, dataset.height, dataset.crs, dataset.transform)

    @property
    def georeferenced(self) -> bool:
        """False for images such as DeepGlobe's: outputs are then in pixel coordinates."""
        return self.crs is not None

    @property
    def vector_transform(self) -> Affine:
        """Pixel -> vector coordinates: the raster's transform, or (col, -row) when it has none."""
        return UNGEOREFERENCED_VECTOR_TRANSFORM if self.transform == Affine.identity() else self.transform


def style_path(raster_path: str | Path) -> Path:
    """The QGIS style beside a raster (`map.tif` -> `map.qml`), which QGIS loads by itself."""
    return Path(raster_path).with_suffix(".qml")


# --- rasters ----------------------------------------------------------------------------------


@contextlib.contextmanager
def class_raster_writer(path: str | Path, scheme: ClassScheme, grid: Grid) -> Iterator[DatasetWriter]:
    """Yield a uint8 single-band dataset on `grid` to fill window by window (255 = nodata).

    When the block succeeds it becomes a COG at `path` (colour table, class names, nearest-neighbour
    overviews) with a QGIS style beside it; on an exception neither file appears.
    """

    def describe(dst: DatasetWriter) -> None:
        dst.write_colormap(1, class_colormap(scheme))
        dst.set_band_description(1, f"class ({scheme.name})")
        dst.update_tags(**_class_tags(scheme))

    with _cog_writer(
        path, grid, count=1, dtype="uint8", nodata=IGNORE_INDEX, describe=describe, RESAMPLING="NEAREST"
    ) as dst:
        yield dst
    write_qml(style_path(path), scheme)


@contextlib.contextmanager
def probability_writer(path: str | Path, scheme: ClassScheme, grid: Grid) -> Iterator[DatasetWriter]:
    """Yield a float32 dataset with one band per class (NaN = nodata) that becomes a COG at `path`
    (stored as `_fraction_writer` says)."""

    def describe(dst: DatasetWriter) -> None:
        dst.descriptions = scheme.names
        dst.update_tags(**_class_tags(scheme))

    with _fraction_writer(path, grid, scheme.num_classes, describe) as dst:
        yield dst


def write_class_raster(classes: np.ndarray, path: str | Path, scheme: ClassScheme, grid: Grid) -> Path:
    """Write an in-memory (H, W) class-id array as a class-map COG plus its QGIS style."""
    if classes.shape != (grid.height, grid.width):
        raise ValueError(f"class array of shape {classes.shape} does not fit the grid {grid.height}x{grid.width}")
    with class_raster_writer(path, scheme, grid) as dst:
        dst.write(classes.astype(np.uint8, copy=False), 1)
    return Path(path)


def class_colormap(scheme: ClassScheme) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table: each class opaque in its colour, nodata (255) transparent black."""
    return {
        **{class_id: (*color, 255) for class_id, color in enumerate(scheme.colors)},
        IGNORE_INDEX: (0, 0, 0, 0),
    }


def _class_tags(scheme: ClassScheme) -> dict[str, str]:
    return {CLASS_SCHEME_TAG: scheme.name, CLASS_NAMES_TAG: json.dumps(list(scheme.names))}


CONFIDENCE_DESCRIPTION = "confidence: the map's probability of the class it shows (0-1)"


@contextlib.contextmanager
def confidence_writer(path: str | Path, grid: Grid) -> Iterator[DatasetWriter]:
    """Yield a float32 single-band dataset (NaN = nodata) that becomes a COG at `path`, with a
    QGIS style showing it as a red-to-green ramp (`write_ramp_qml`).

    The band is the blended probability of the class the map shows at each pixel, the number a
    person reads to see where the map is unsure; its description says so. Overviews average it
    and it is stored as the probabilities are (`_fraction_writer`).
    """

    def describe(dst: DatasetWriter) -> None:
        dst.set_band_description(1, CONFIDENCE_DESCRIPTION)

    with _fraction_writer(path, grid, 1, describe) as dst:
        yield dst
    write_ramp_qml(style_path(path))


@contextlib.contextmanager
def _fraction_writer(
    path: str | Path, grid: Grid, count: int, describe: Callable[[DatasetWriter], None]
) -> Iterator[DatasetWriter]:
    """A float32 COG of values in 0..1 (NaN = nodata): probabilities and the confidence.

    Overviews average them, which keeps probabilities probabilities. Zstandard (level 1) with the
    floating-point predictor: float32 probabilities barely compress, and zstd gives the size of
    deflate level 1 (149 against 147 MiB for 10 classes at 2048²) in half its time (1.9 against
    3.9 s), which was most of what writing probabilities cost (GDAL >= 2.3 and every QGIS 3 read
    it). For the same reason the staging file is not compressed: zstd saved under a tenth of its
    size and cost a compression while writing and a decompression in each of the COG copy's two
    passes (overviews, then the full resolution).
    """
    with _cog_writer(
        path,
        grid,
        count=count,
        dtype="float32",
        nodata=float("nan"),
        describe=describe,
        compress_staging=False,
        RESAMPLING="AVERAGE",
        COMPRESS="ZSTD",
        PREDICTOR="YES",
        LEVEL=1,
    ) as dst:
        yield dst


@contextlib.contextmanager
def _cog_writer(
    path: str | Path,
    grid: Grid,
    *,
    count: int,
    dtype: str,
    nodata: float,
    describe: Callable[[DatasetWriter], None],
    compress_staging: bool = True,
    **cog_options: str | int,
) -> Iterator[DatasetWriter]:
    """Staging GTiff -> COG (deflate unless `cog_options` say otherwise), atomically.

    Staging blocks are COG-block wide and 16 rows tall: row strips of any height fill whole blocks
    (or leave one 16-row partial block row in GDAL's cache), and the COG copy reads each of its
    tiles without decoding the scene's full width again and again. Fast zstd (`compress_staging`),
    read back twice (overviews, full resolution). The COG copy compresses in one thread: GDAL's
    NUM_THREADS keeps 150 MiB more of buffers in flight at 2 threads, 220 MiB at 4.
    """
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": count,
        "dtype": dtype,
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": nodata,
        "interleave": "pixel",
        "tiled": True,
        "blockxsize": COG_BLOCKSIZE,
        "blockysize": STAGING_BLOCK_ROWS,
        "bigtiff": "if_safer",
        **({"compress": "zstd", "zstd_level": 1} if compress_staging else {}),
    }
    with atomic_output(path) as target, scratch_file(path, ".tif") as staging:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel coordinates, on purpose
            dst = rasterio.open(staging, "w", **profile)
        with dst:
            describe(dst)
            yield dst
        rasterio.shutil.copy(
            staging,
            target,
            driver="COG",
            BLOCKSIZE=COG_BLOCKSIZE,
            OVERVIEWS="IGNORE_EXISTING",
            BIGTIFF="IF_SAFER",
            **{"COMPRESS": "DEFLATE", **cog_options},
        )


# --- QGIS style -------------------------------------------------------------------------------


def write_qml(path: str | Path, scheme: ClassScheme) -> Path:
    """A QGIS style with a paletted renderer: one named, coloured entry per class id."""
    root, pipe = _qml_pipe()
    renderer = ET.SubElement(
        pipe, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1", nodataColor=""
    )
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for class_id, (name, (red, green, blue)) in enumerate(zip(scheme.names, scheme.colors)):
        ET.SubElement(
            palette,
            "paletteEntry",
            value=str(class_id),
            color=f"#{red:02x}{green:02x}{blue:02x}",
            label=name,
            alpha="255",
        )
    return _write_qml_document(path, root, pipe)


CONFIDENCE_RAMP = ((0.0, "#d7191c", "uncertain"), (0.5, "#fdae61", ""), (0.75, "#ffffbf", ""), (1.0, "#1a9641", "sure"))
"""(value, colour, label) stops of the confidence style: red where the map is unsure, green where
it is sure (ColorBrewer's RdYlGn, colour-blind safer ends than pure red and green)."""


def write_ramp_qml(path: str | Path, stops: Sequence[tuple[float, str, str]] = CONFIDENCE_RAMP) -> Path:
    """A QGIS style with a pseudocolour ramp over band 1, interpolated between `stops`, its
    minimum and maximum fixed to theirs (not stretched to the raster's statistics)."""
    low, high = stops[0][0], stops[-1][0]
    root, pipe = _qml_pipe()
    renderer = ET.SubElement(
        pipe,
        "rasterrenderer",
        type="singlebandpseudocolor",
        band="1",
        opacity="1",
        alphaBand="-1",
        classificationMin=str(low),
        classificationMax=str(high),
        nodataColor="",
    )
    ET.SubElement(renderer, "rasterTransparency")
    origin = ET.SubElement(renderer, "minMaxOrigin")
    for tag, text in (("limits", "None"), ("extent", "WholeRaster"), ("statAccuracy", "Estimated")):
        ET.SubElement(origin, tag).text = text
    shader = ET.SubElement(ET.SubElement(renderer, "rastershader"), "colorrampshader")
    shader.attrib.update(
        colorRampType="INTERPOLATED",
        classificationMode="1",
        clip="0",
        minimumValue=str(low),
        maximumValue=str(high),
        labelPrecision="2",
    )
    for value, color, label in stops:
        text = f"{value:.2f}" + (f" ({label})" if label else "")
        ET.SubElement(shader, "item", value=str(value), color=color, label=text, alpha="255")
    return _write_qml_document(path, root, pipe)


def _qml_pipe() -> tuple[ET.Element, ET.Element]:
    """A QGIS style document and its render pipe, nearest-neighbour resampling (no blurring)."""
    root = ET.Element("qgis", version="3.28.0", styleCategories="AllStyleCategories")
    pipe = ET.SubElement(root, "pipe")
    provider = ET.SubElement(pipe, "provider")
    ET.SubElement(
        provider,
        "resampling",
        enabled="false",
        zoomedInResamplingMethod="nearestNeighbour",
        zoomedOutResamplingMethod="nearestNeighbour",
        maxOversampling="2",
    )
    return root, pipe


def _write_qml_document(path: str | Path, root: ET.Element, pipe: ET.Element) -> Path:
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    text = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode")
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


# --- polygons ---------------------------------------------------------------------------------


def write_polygons(class_raster: str | Path, path: str | Path, scheme: ClassScheme, *, layer: str = "classes") -> Path:
    """Polygonise a class raster into a GeoPackage layer (`class_id`, `class_name`, geometry).

    GDAL polygonises straight from the file, line by line, so the raster is never loaded whole;
    memory grows with the number of polygons (a speckled map makes many), not with the raster.
    Nodata (255) is left out. The layer is in the raster's CRS; without one, in the pixel
    coordinates QGIS uses for the raster (x = col, y = -row).
    """
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(pending(class_raster)) as src:
        grid = Grid.of(src)
        features = (
            (geometry, int(value))
            for geometry, value in shapes(rasterio.band(src, 1), connectivity=4)
            if int(value) != IGNORE_INDEX
        )
        with atomic_output(path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'crs' was not provided")  # pixel coordinates, on purpose
            for index, chunk in enumerate(_chunks(features)):
                _polygon_frame(chunk, scheme, grid, Path(class_raster)).to_file(
                    tmp,
                    layer=layer,
                    driver="GPKG",
                    engine="pyogrio",
                    mode="a" if index else "w",
                    geometry_type="Polygon",
                )
    return Path(path)


def _chunks(features: Iterator[tuple[dict, int]]) -> Iterator[list[tuple[dict, int]]]:
    """Lists of up to POLYGON_CHUNK features; the first always comes, so even an empty layer exists."""
    chunk = list(itertools.islice(features, POLYGON_CHUNK))
    yield chunk
    while len(chunk) == POLYGON_CHUNK:
        chunk = list(itertools.islice(features, POLYGON_CHUNK))
        if chunk:
            yield chunk


def _polygon_frame(features: list[tuple[dict, int]], scheme: ClassScheme, grid: Grid, source: Path) -> gpd.GeoDataFrame:
    class_ids = np.array([value for _, value in features], dtype=np.int32)
    if class_ids.size and class_ids.max() >= scheme.num_classes:
        raise DataError(source, f"holds class id {class_ids.max()}, but {scheme.name} has {scheme.num_classes} classes")
    geometries = shapely.from_geojson([json.dumps(geometry) for geometry, _ in features])  # GEOS parses in bulk
    if grid.vector_transform != grid.transform:  # GDAL polygonised in (col, row): flip to y = -row
        geometries = shapely.transform(geometries, lambda xy: xy * np.array([1.0, -1.0]))
    return gpd.GeoDataFrame(
        {"class_id": class_ids, "class_name": [scheme.names[class_id] for class_id in class_ids]},
        geometry=gpd.GeoSeries(geometries, crs=grid.crs),
    )
