"""The `catalog` step: gather the STAC Items beside a folder's maps into one STAC Catalog.

Every `MAP.stac.json` below the folder (hidden files and folders aside: temporaries, caches) is
read and checked before anything is written; a folder without items, or a file that is not a
STAC Item, is a DataError naming it and leaves no catalog. The catalog links to the items where
they lie, by relative hrefs, so the folder can be moved or served as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geo.atomic import check_output_file
from geo.errors import DataError
from geo.stac import ITEM_SUFFIX, write_catalog

CATALOG_NAME = "catalog.json"
"""Where the catalog goes by default: in the folder it gathers, under the name STAC tools expect."""


@dataclass(frozen=True)
class CatalogSummary:
    path: Path
    items: list[Path]


def build_catalog(folder: Path | str, out: Path | str | None = None, *, title: str | None = None) -> CatalogSummary:
    """Write a STAC Catalog of every item below `folder` to `out` (default `FOLDER/catalog.json`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "is not a folder of maps")
    out = Path(out) if out is not None else folder / CATALOG_NAME
    check_output_file(out, "--out")
    items = find_items(folder)
    if not items:
        raise DataError(folder, f"holds no STAC items (*{ITEM_SUFFIX}, written beside each map by adapt and predict)")
    folder_name = folder.resolve().name or "maps"
    write_catalog(
        items,
        out,
        catalog_id=title or folder_name,
        title=title or folder_name,
        description=f"Land-cover maps made by landcover adapt and predict, gathered from the folder {folder_name}",
    )
    return CatalogSummary(out, items)


def find_items(folder: Path) -> list[Path]:
    """The item files below `folder`, in path order; hidden files and folders are not looked in."""
    return sorted(
        path
        for path in folder.rglob(f"*{ITEM_SUFFIX}")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
