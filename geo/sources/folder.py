"""Class folders, as EuroSAT ships them: one folder per class, one patch per file.

Layout::

    ROOT/<ClassName>/<anything>.tif      e.g. ROOT/River/River_1.tif (EuroSAT: 64 x 64 px, 13 bands)

Every pixel of a patch is its folder's class; the scheme is the folder names in sorted order
(colours from a default palette). Patches must be georeferenced: a region is a UTM zone (the
patch's CRS). An empty class folder is reported and left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import folder_scheme
from geo.errors import DataError
from geo.sources.base import Dataset, Source, SourceFile, region_names

SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class ClassFolders(Source):
    """EuroSAT-style `ROOT/<ClassName>/*.tif` patches, one class each."""

    name: ClassVar[str] = "folder"
    sample_kind: ClassVar[str | None] = "eurosat"

    def _discover(self, root: Path) -> Dataset:
        """Class folders with patches make the scheme; an empty class folder is a problem of its own."""
        patches: dict[str, list[Path]] = {}
        problems = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
            if found:
                patches[folder.name] = found
            else:
                problems.append(DataError(folder, "class folder holds no .tif patches"))
        if not patches:
            raise DataError(root, "no class folders with .tif patches (expected <root>/<ClassName>/*.tif)")
        scheme = folder_scheme(list(patches))
        files = [SourceFile(path, class_id=scheme.names.index(name)) for name in scheme.names for path in patches[name]]
        return Dataset(self, root, scheme, files, problems)

    def read_mask(self, file: SourceFile, labels: DatasetReader | None, window: Window) -> np.ndarray:
        """The folder's class everywhere."""
        return np.full((window.height, window.width), file.class_id, dtype=np.uint8)

    def regions(self, frame: pd.DataFrame) -> pd.Series:
        """The CRS of the patch: `EPSG:326nn`, its UTM zone."""
        return region_names(frame["crs"], "column 'crs' (the UTM zone)")
