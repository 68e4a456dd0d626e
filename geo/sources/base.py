"""What a dataset layout is to the rest of the pipeline: the `Source` interface.

A source knows how its files are laid out, how an image and its labels are read into a tile,
its class scheme and band names, how its files are cut into tiles and what region metadata it
offers. Ingest, regions, splits and episode samplers ask the source, never its name; a new layout
is one module under `geo/sources/` and one line in the registry (`geo/sources/__init__.py`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import RGB_BANDS, S2_BANDS, ClassScheme
from geo.errors import DataError
from geo.readers import SourceFile, Tile, check_same_size, read_tiles

__all__ = ["Dataset", "Source", "SourceFile", "region_names"]


@dataclass(frozen=True)
class Dataset:
    """The files of one dataset, its class scheme, and problems found while listing it."""

    source: Source
    root: Path
    scheme: ClassScheme
    files: list[SourceFile]
    problems: list[DataError] = field(default_factory=list)


@dataclass(frozen=True)
class Source(ABC):
    """A dataset layout. Subclasses document their format in their docstring.

    Class attributes say how the rest of the pipeline treats the source's tiles; the methods find
    and read its files. A source is a small frozen dataclass: Dask workers receive it, and its
    fields (a pairs source's classes) are what a flow's cache key and the index metadata hold.
    """

    name: ClassVar[str]
    """The name users give with `--source` and the index stores in its metadata."""
    sample_kind: ClassVar[str | None] = None
    """The `landcover sample-data --kind` that writes this layout, if the generator has one."""
    georeferenced: ClassVar[bool] = True
    """Whether every image must carry a CRS."""
    cut_into_grid: ClassVar[bool] = False
    """Whether ingest cuts each image into `--grid` x `--grid` tiles (else one tile per file)."""
    dense_episodes: ClassVar[bool] = False
    """Segmentation episodes label every pixel of a few large tiles (`DenseSegmentationSampler`)."""
    kmeans_unit: ClassVar[str | None] = None
    """The index column whose rows KMeans clusters as one unit (the tiles of one image), if any."""
    takes_classes: ClassVar[bool] = False
    """Whether the source's classes come from a classes file (`--classes`) rather than its format."""
    split_together: ClassVar[str | None] = None
    """An index column whose value ties regions to one split (a SEN12MS scene seen in two seasons)."""

    # --- finding files ---------------------------------------------------------------------

    def discover(self, root: str | Path) -> Dataset:
        """List a dataset's files in sorted order; DataError when the root holds none of them."""
        root = Path(root)
        if root.is_file():
            raise DataError(root, "is a file, not a folder")
        if not root.is_dir():
            raise DataError(root, "no such folder")
        return self._discover(root)

    @abstractmethod
    def _discover(self, root: Path) -> Dataset:
        """The files under an existing folder `root`."""

    # --- reading -----------------------------------------------------------------------------

    def band_names(self, count: int) -> tuple[str, ...]:
        """Names of the image bands: S2 for 13 bands, RGB for 3, else band1..bandN."""
        if count == len(S2_BANDS):
            return S2_BANDS
        if count == len(RGB_BANDS):
            return RGB_BANDS
        return tuple(f"band{number}" for number in range(1, count + 1))

    def check_image(self, path: Path, image: DatasetReader) -> None:
        """DataError when an opened image cannot be one of this source's."""
        if self.georeferenced and image.crs is None:
            raise DataError(path, f"has no CRS; {self.name} images must be georeferenced")

    def check_labels(self, file: SourceFile, image: DatasetReader, labels: DatasetReader) -> None:
        """DataError when a label file does not lie on its image's grid (by default: same size;
        a source with more to check, such as CRS and transform, extends this)."""
        labels, label_path = self.label_file(file, labels)
        check_same_size(file.path, image, label_path, labels)

    def label_file(self, file: SourceFile, labels: DatasetReader | None) -> tuple[DatasetReader, Path]:
        """The opened label file of an image that must have one, and its path."""
        if labels is None or file.label_path is None:
            raise DataError(file.path, f"a {self.name} image needs a label file")
        return labels, file.label_path

    @abstractmethod
    def read_mask(self, file: SourceFile, labels: DatasetReader | None, window: Window) -> np.ndarray:
        """uint8 (H, W) class ids of a window of `file` (255 = ignore)."""

    def read(self, file: SourceFile, window: Window | None = None, *, with_s1: bool = False) -> Tile:
        """One file's tile (the whole file, or a window of it)."""
        (located,) = read_tiles(self, file, window=window, with_s1=with_s1)
        return located.tile

    # --- what later steps ask of the index's rows -------------------------------------------

    def regions(self, frame: pd.DataFrame) -> pd.Series:
        """Region names of the rows from the source's own metadata; ValueError when it has none."""
        hint = " (or --column scene: one region per image)" if self.kmeans_unit == "scene" else ""
        raise ValueError(
            f"source {self.name} has no metadata that names regions: use --by kmeans{hint} "
            "or name an index column with --column"
        )

    def acquisitions(self, frame: pd.DataFrame) -> pd.Series:
        """Per row, the acquisition it belongs to within its region ("": the region is one)."""
        return pd.Series("", index=frame.index, dtype=object)

    # --- what the index stores to read the tiles again --------------------------------------

    def settings(self) -> dict[str, Any]:
        """What the index metadata keeps so `from_settings` rebuilds this source: its fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Source:
        return cls(**settings)

    @classmethod
    def configure(cls, classes: Path | None = None) -> Source:
        """The source as the CLI's options describe it; only some sources take a classes file."""
        if classes is not None:
            raise ValueError(f"--classes does not apply to the {cls.name} source (its classes are fixed)")
        return cls()


def region_names(values: pd.Series, what: str) -> pd.Series:
    """Values as region names; an error when some rows have none (a region would be 'nan')."""
    missing = int(values.isna().sum())
    if missing:
        raise ValueError(f"{what} has no value in {missing} of {len(values)} rows")
    return values.astype(str).astype(object).rename("region")
