"""STAC metadata for the maps: an Item beside every map, and a Catalog gathering a folder of them.

`write_map_item` writes `MAP.stac.json` beside `MAP.tif` (`item_path`): a STAC 1.1 Item whose
geometry and bbox are the map's footprint in EPSG:4326, with the projection extension (the
map's grid: `proj:code`, `proj:shape`, `proj:transform`, `proj:bbox`), and one asset per file of
the map: the class map itself (raster extension: uint8, nodata 255; classification extension:
every class of the scheme with its name, title and colour, and 255 as the nodata class), its
QGIS style, and whichever of probabilities, confidence, polygons and reports were written.
Assets are given as role -> path (`ASSET_KINDS` says what each role is), and their hrefs are
relative to the item, so a folder of maps can be moved or served as it is. A map rewritten
without an optional file gets a new item without that asset.

The item is read back from what was written (inside `geo.atomic.output_group`, from the staged
files through `pending`) and written through `atomic_output`, so it appears with the map.

`read_item` and `write_catalog` serve `landcover catalog`: a self-contained STAC Catalog
(relative links) whose item links point at the items where they lie; the items are not changed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import shapely
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension
from pystac.utils import make_relative_href
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetReader
from rasterio.warp import transform_bounds, transform_geom

from geo.atomic import atomic_output, pending
from geo.classes import IGNORE_INDEX, ClassScheme
from geo.errors import DataError

ITEM_SUFFIX = ".stac.json"
"""`map.tif` -> `map.stac.json`; `landcover catalog` gathers files with this ending."""
PROVENANCE_PREFIX = "landcover:"
"""Item properties saying how the map was made (method, model, scene, estimated accuracy)."""
WGS84 = "EPSG:4326"
DEGREE_DECIMALS = 7
"""Decimals of the footprint's longitudes and latitudes: about a centimetre."""
BBOX_DENSIFY_POINTS = 21
"""Points added along each side of the bounds before they are reprojected into the bbox."""
SCENE_DATETIME_TAG = "TIFFTAG_DATETIME"
ITEM_FIELDS = ("stac_version", "id", "geometry", "properties", "links", "assets")
"""What every STAC Item has besides its type (core Item spec)."""


@dataclass(frozen=True)
class AssetKind:
    """What an asset role holds: its media type, STAC roles and title."""

    media_type: str
    roles: tuple[str, ...]
    title: str

    @property
    def raster(self) -> bool:
        return self.media_type == pystac.MediaType.COG


ASSET_KINDS: dict[str, AssetKind] = {
    "map": AssetKind(pystac.MediaType.COG, ("data",), "Land-cover classes"),
    "style": AssetKind(pystac.MediaType.XML, ("style", "metadata"), "QGIS style (paletted, one entry per class)"),
    "probabilities": AssetKind(pystac.MediaType.COG, ("data",), "Class probabilities (a band per class, in id order)"),
    "confidence": AssetKind(pystac.MediaType.COG, ("data", "quality"), "Confidence of each pixel's class"),
    "confidence-style": AssetKind(pystac.MediaType.XML, ("style", "metadata"), "QGIS style of the confidence (a ramp)"),
    "polygons": AssetKind(pystac.MediaType.GEOPACKAGE, ("data",), "Class polygons"),
    "suggestions": AssetKind(pystac.MediaType.GEOPACKAGE, ("metadata",), "Points to label next (a class to fill in)"),
    "report": AssetKind(pystac.MediaType.JSON, ("metadata",), "Estimated accuracy of the map (JSON)"),
    "report-markdown": AssetKind("text/markdown", ("metadata",), "Estimated accuracy of the map"),
}
"""Every role an item's assets may have; a new output of a map is one line here."""


def item_path(map_path: str | Path) -> Path:
    """The STAC Item beside a map: `map.tif` -> `map.stac.json`."""
    map_path = Path(map_path)
    return map_path.with_name(map_path.stem + ITEM_SUFFIX)


def write_map_item(
    map_path: str | Path,
    scheme: ClassScheme,
    *,
    scene: str | Path,
    assets: Mapping[str, str | Path | None],
    provenance: Mapping[str, Any],
) -> Path:
    """Write the STAC Item of a class map (see the module docstring) and return its path.

    `assets`: role (a key of `ASSET_KINDS` other than "map", which is `map_path`) -> file, or
    None when this run did not write it. `provenance`: plain values saved as `landcover:KEY`
    (None: left out). The datetime is the scene's `TIFFTAG_DATETIME` where it has one (its
    acquisition, in most files), else the time the map was written.
    """
    unknown = set(assets) - set(ASSET_KINDS).difference({"map"})
    if unknown:
        raise ValueError(f"unknown asset roles {sorted(unknown)}; known: {', '.join(ASSET_KINDS)}")
    target = item_path(map_path)
    written = dt.datetime.now(dt.timezone.utc)
    with _open(pending(map_path)) as src:
        crs, transform, shape, bounds = src.crs, src.transform, [src.height, src.width], list(src.bounds)
    resolution = _metres(crs, abs(transform.a))
    geometry, bbox = _footprint(crs, bounds)
    item = pystac.Item(
        id=Path(map_path).stem,
        geometry=geometry,
        bbox=bbox,
        datetime=_scene_datetime(scene) or written,
        properties={
            "title": f"Land cover of {Path(scene).name}",
            "created": pystac.utils.datetime_to_str(written),
            **{PROVENANCE_PREFIX + key: value for key, value in provenance.items() if value is not None},
        },
    )
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=_crs_code(crs),
        wkt2=_crs_wkt2(crs),
        shape=shape,
        transform=list(transform),
        bbox=bounds if crs is not None else None,
    )
    for role, path in {"map": map_path, **assets}.items():
        if path is None:
            continue
        asset = _asset(role, Path(path), target)
        item.add_asset(role, asset)
        if ASSET_KINDS[role].raster:
            with _open(pending(path)) as src:
                RasterExtension.ext(asset, add_if_missing=True).apply(_bands(src, resolution))
    item.assets["map"].description = f"uint8 class ids of the {scheme.name} classes; {IGNORE_INDEX} = nodata"
    ClassificationExtension.ext(item.assets["map"], add_if_missing=True).apply(classes=_classes(scheme))
    with atomic_output(target) as tmp:
        tmp.write_text(json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False), indent=2) + "\n")
    return target


def _asset(role: str, path: Path, item_file: Path) -> pystac.Asset:
    kind = ASSET_KINDS[role]
    href = make_relative_href(os.path.abspath(path), os.path.abspath(item_file))
    return pystac.Asset(href, title=kind.title, media_type=kind.media_type, roles=list(kind.roles))


def _classes(scheme: ClassScheme) -> list[Classification]:
    """One class per id of the scheme (a machine name, the name as shown, the colour), and nodata."""
    names: list[str] = []
    for class_id, name in enumerate(scheme.names):
        slug = re.sub(r"[^0-9a-z]+", "-", name.lower()).strip("-")  # the extension's names: [0-9A-Za-z-_]
        names.append(slug if slug and slug not in names else f"class-{class_id}")
    return [
        *(
            Classification.create(value=class_id, name=slug, title=title, color_hint=f"{red:02X}{green:02X}{blue:02X}")
            for class_id, (slug, title, (red, green, blue)) in enumerate(zip(names, scheme.names, scheme.colors))
        ),
        Classification.create(value=IGNORE_INDEX, name="nodata", title="No data", nodata=True),
    ]


def _open(path: Path) -> DatasetReader:
    """A written raster; one without a CRS (pixel coordinates, on purpose) opens without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _bands(src: DatasetReader, resolution: float | None) -> list[RasterBand]:
    """Raster band objects: data type, nodata (NaN as the extension's "nan"), resolution in metres."""
    nodata: float | NoDataStrings | None = src.nodata
    if nodata is not None and np.isnan(nodata):
        nodata = NoDataStrings.NAN  # "nan"
    elif nodata is not None and float(nodata).is_integer():
        nodata = int(nodata)  # GDAL keeps every nodata as a double; a class map's is 255, not 255.0
    return [
        RasterBand.create(data_type=DataType(dtype), nodata=nodata, spatial_resolution=resolution)
        for dtype in src.dtypes
    ]


def _metres(crs: CRS | None, pixel_size: float) -> float | None:
    """A pixel's size in metres, where the CRS is projected (degrees have no one size)."""
    if crs is None or not crs.is_projected:
        return None
    _, factor = crs.linear_units_factor
    return pixel_size * factor


def _footprint(crs: CRS | None, bounds: list[float]) -> tuple[dict[str, Any] | None, list[float] | None]:
    """The map's corners as a GeoJSON polygon in EPSG:4326 (to about a centimetre), and the bbox
    of its bounds in EPSG:4326 (densified: a projected square's edges curve in degrees, and the
    bbox holds them); None and None without a CRS (pixel coordinates)."""
    if crs is None:
        return None, None
    left, bottom, right, top = bounds
    corners = shapely.geometry.mapping(shapely.box(left, bottom, right, top))
    geometry = transform_geom(crs, WGS84, corners, precision=DEGREE_DECIMALS)
    return geometry, list(transform_bounds(crs, WGS84, left, bottom, right, top, densify_pts=BBOX_DENSIFY_POINTS))


def _crs_code(crs: CRS | None) -> str | None:
    """The CRS as "AUTHORITY:CODE" (e.g. "EPSG:32633"), None for none or one without a code."""
    authority = crs.to_authority() if crs is not None else None
    return f"{authority[0]}:{authority[1]}" if authority else None


def _crs_wkt2(crs: CRS | None) -> str | None:
    """WKT2 of a CRS that has no authority code, the one way to name it then."""
    return crs.to_wkt("WKT2_2019") if crs is not None and _crs_code(crs) is None else None


def _scene_datetime(scene: str | Path) -> dt.datetime | None:
    """The scene's TIFFTAG_DATETIME ("YYYY:MM:DD HH:MM:SS", taken as UTC), None when missing or garbled."""
    with rasterio.open(scene) as src:
        stamp = src.tags().get(SCENE_DATETIME_TAG)
    try:
        return dt.datetime.strptime(stamp.strip(), "%Y:%m:%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
    except (AttributeError, ValueError):
        return None


# --- the catalog ------------------------------------------------------------------------------


def read_item(path: str | Path) -> pystac.Item:
    """A STAC Item file, or a DataError naming it when it is not valid JSON or not an Item."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(path, f"is not a STAC Item (not text: {error.reason})") from None
    except json.JSONDecodeError as error:
        raise DataError(path, f"is not a STAC Item (invalid JSON: {error})") from None
    if not isinstance(content, dict) or content.get("type") != "Feature":
        raise DataError(path, 'is not a STAC Item (no "type": "Feature")')
    missing = [key for key in ITEM_FIELDS if key not in content]
    if missing:
        raise DataError(path, f"is not a STAC Item (no {', '.join(missing)})")
    try:
        return pystac.Item.from_dict(content, href=os.path.abspath(path), migrate=True, preserve_dict=False)
    except (pystac.STACError, pystac.STACTypeError, KeyError, TypeError, ValueError) as error:
        raise DataError(path, f"is not a STAC Item ({type(error).__name__}: {error})") from None


def write_catalog(items: Sequence[Path], out: str | Path, *, catalog_id: str, title: str, description: str) -> Path:
    """A self-contained STAC Catalog at `out` linking to each item file by a relative href
    (read with `read_item` first: a catalog never links to a file that is not an Item)."""
    out = Path(out)
    catalog = pystac.Catalog(
        id=catalog_id, description=description, title=title, catalog_type=pystac.CatalogType.SELF_CONTAINED
    )
    catalog.set_self_href(os.path.abspath(out))
    for path in items:
        item = read_item(path)
        href = make_relative_href(os.path.abspath(path), os.path.abspath(out))
        catalog.add_link(pystac.Link(pystac.RelType.ITEM, href, media_type=pystac.MediaType.GEOJSON, title=item.id))
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(catalog.to_dict(include_self_link=False), indent=2) + "\n")
    return out
