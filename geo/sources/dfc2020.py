"""DFC2020 (IEEE GRSS Data Fusion Contest 2020): SEN12MS-style patches with hand-checked labels.

The test set of the few-shot land-cover paper this product follows. Layout of the release::

    ROOT/ROIs0000_test/s2_0/ROIs0000_test_s2_0_p<n>.tif             13 bands as SEN12MS s2
    ROOT/ROIs0000_test/s1_0/ROIs0000_test_s1_0_p<n>.tif             VV, VH (optional)
    ROOT/ROIs0000_test/dfc_0/ROIs0000_test_dfc_0_p<n>.tif           uint16 labels
    ROOT/ROIs0000_validation/s2_validation/ROIs0000_validation_s2_0_p<n>.tif   (and dfc_validation/)

Patches are 256 x 256 px, one tile each. Labels are 1..10 in the DFC-10 order (1 Forest …
10 Water); 0 and 255 are unlabelled; any other value is an error naming the file. The release
drops the patches' scene ids (all are scene 0), so regions come from KMeans unless the files
name more than one scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import DFC10, IGNORE_INDEX
from geo.errors import DataError
from geo.readers import read_window
from geo.sources.base import SourceFile
from geo.sources.sen12ms import Sen12ms

UNLABELLED = (0, 255)
"""Label values of pixels nobody labelled."""

_LOOKUP = np.full(65536, -1, dtype=np.int16)
_LOOKUP[1 : DFC10.num_classes + 1] = np.arange(DFC10.num_classes)
_LOOKUP[list(UNLABELLED)] = IGNORE_INDEX


@dataclass(frozen=True)
class Dfc2020(Sen12ms):
    """DFC2020 patches: `ROIs0000_*/s2_<x>/…_s2_<scene>_p<n>.tif` with `dfc_<x>` labels."""

    name: ClassVar[str] = "dfc2020"
    sample_kind: ClassVar[str | None] = None
    split_together: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "dfc"
    _expected: ClassVar[str] = "ROIs0000_<set>/s2_<x>/ROIs0000_<set>_s2_<scene>_p<n>.tif"

    def _scene(self, s2: Path) -> str:
        """The scene id in the file name (`…_s2_<scene>_p<n>`): the folder may be `s2_validation`."""
        return s2.stem.rpartition("_s2_")[2].rpartition("_p")[0]

    def read_mask(self, file: SourceFile, labels: DatasetReader | None, window: Window) -> np.ndarray:
        """Labels 1..10 as DFC-10 ids 0..9; 0 and 255 ignored."""
        labels, label_path = self.label_file(file, labels)
        values = read_window(labels, label_path, window, 1)
        if values.dtype.kind not in "ui":
            raise DataError(label_path, f"holds {values.dtype} values; DFC2020 labels are integers 1..10")
        wide = values.astype(np.int64)
        ids = np.where((wide >= 0) & (wide < len(_LOOKUP)), _LOOKUP[np.clip(wide, 0, len(_LOOKUP) - 1)], -1)
        unknown = np.unique(values[ids < 0])
        if len(unknown):
            shown = ", ".join(str(int(value)) for value in unknown[:8])
            raise DataError(
                label_path, f"holds label value(s) {shown}; DFC2020 labels are 1..10 (0 and 255 unlabelled)"
            )
        return ids.astype(np.uint8)

    def regions(self, frame: pd.DataFrame) -> pd.Series:
        """`<set>/<scene>` where the files name several scenes; else no region metadata (the test
        and validation sets are not places)."""
        if frame["scene"].nunique() < 2:
            return super(Sen12ms, self).regions(frame)
        return super().regions(frame)
