"""SEN12MS (Schmitt et al. 2019): Sentinel-1/2 patches with MODIS land cover, by season and scene.

Layout of the release (one folder per season, one per kind and scene)::

    ROOT/ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.tif    13 bands B1..B12, uint16 reflectance x 10000
    ROOT/ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif    2 bands VV, VH in dB (optional)
    ROOT/ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p30.tif    4 bands; band 1 = IGBP code 1..17

Patches are 256 x 256 px on a UTM grid, one tile each. IGBP codes map onto the 10 simplified
DFC classes (`geo.classes.IGBP_TO_DFC10`); other codes are ignored. A region is one (season,
scene); the same scene id seen in two seasons is one place, so its regions share a split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import DFC10, IGBP_TO_DFC10, IGNORE_INDEX, S2_BANDS
from geo.errors import DataError
from geo.readers import read_window
from geo.sources.base import Dataset, Source, SourceFile, region_names


@dataclass(frozen=True)
class Sen12ms(Source):
    """SEN12MS patches: `ROIs*/s2_<scene>/…_s2_<scene>_p<n>.tif` with `lc_`/`s1_` partners."""

    name: ClassVar[str] = "sen12ms"
    sample_kind: ClassVar[str | None] = "sen12ms"
    split_together: ClassVar[str | None] = "scene"
    label_kind: ClassVar[str] = "lc"
    """Folder and file-name part of the label partner of an `s2` patch."""

    def _discover(self, root: Path) -> Dataset:
        files = []
        for s2 in sorted(root.glob("ROIs*/s2_*/*.tif")):
            season = s2.parent.parent.name
            s1 = partner(s2, "s1")
            files.append(
                SourceFile(s2, partner(s2, self.label_kind), s1 if s1.exists() else None, season, self._scene(s2))
            )
        if not files:
            raise DataError(root, f"no {self.name} patches (expected {self._expected})")
        return Dataset(self, root, DFC10, files)

    _expected: ClassVar[str] = "ROIs*/s2_<scene>/<season>_s2_<scene>_p<n>.tif"

    def _scene(self, s2: Path) -> str:
        return s2.parent.name.removeprefix("s2_")

    def band_names(self, count: int) -> tuple[str, ...]:
        return S2_BANDS

    def check_image(self, path: Path, image: DatasetReader) -> None:
        if image.count != len(S2_BANDS):
            raise DataError(path, f"has {image.count} bands; {self.name} s2 patches have 13 ({', '.join(S2_BANDS)})")
        super().check_image(path, image)

    def read_mask(self, file: SourceFile, labels: DatasetReader | None, window: Window) -> np.ndarray:
        """Band 1 of the lc patch (IGBP) as DFC-10 class ids."""
        igbp = read_window(*self.label_file(file, labels), window, 1)
        return IGBP_TO_DFC10[np.minimum(igbp, IGNORE_INDEX)]

    def regions(self, frame: pd.DataFrame) -> pd.Series:
        """`<season>/<scene id>`."""
        season = region_names(frame["season"], "column 'season'")
        return (season + "/" + region_names(frame["scene"], "column 'scene'")).rename("region")

    def acquisitions(self, frame: pd.DataFrame) -> pd.Series:
        """One acquisition per (season, scene)."""
        return frame["season"].astype(str) + "/" + frame["scene"].astype(str)


def partner(s2: Path, kind: str) -> Path:
    """The s1, lc or dfc file of an s2 patch: folder `<kind>_<scene>`, `_<kind>_` in the name."""
    folder = s2.parent.with_name(kind + s2.parent.name.removeprefix("s2"))
    return folder / s2.name.replace("_s2_", f"_{kind}_")
