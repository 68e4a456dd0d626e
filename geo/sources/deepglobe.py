"""DeepGlobe land cover (Demir et al. 2018): RGB satellite images with colour-coded masks.

Two layouts of the same files are accepted::

    ROOT/…/<id>_sat.jpg  beside  ROOT/…/<id>_mask.png                 (the release)
    ROOT/…/images/<id>_sat.jpg  with  ROOT/…/masks/<id>_mask.png        (as torchgeo downloads it)

Images are 2448 x 2448 px RGB JPEGs without georeferencing. Mask colours are the class colours
of `geo.classes.DEEPGLOBE` (Unknown (0, 0, 0) is ignored); the release's colours are impure, so
each channel is thresholded at 128. As the authors do, each image is cut into a grid of tiles
(`--grid`, default 4 x 4) and KMeans clusters whole images into regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import DEEPGLOBE, DEEPGLOBE_UNKNOWN_COLOR, IGNORE_INDEX, RGB_BANDS
from geo.errors import DataError
from geo.readers import read_window
from geo.sources.base import Dataset, Source, SourceFile

FAR = 64
"""A mask channel this far from both 0 and 255 is ambiguous, not a jittered class colour."""
MAX_FAR_SHARE = 0.01
"""Share of ambiguous mask pixels above which a mask is rejected as not a DeepGlobe mask."""


@dataclass(frozen=True)
class DeepGlobe(Source):
    """DeepGlobe `<id>_sat.jpg` images with `<id>_mask.png` beside them or in a `masks/` folder."""

    name: ClassVar[str] = "deepglobe"
    sample_kind: ClassVar[str | None] = "deepglobe"
    georeferenced: ClassVar[bool] = False
    cut_into_grid: ClassVar[bool] = True
    dense_episodes: ClassVar[bool] = True
    kmeans_unit: ClassVar[str | None] = "scene"

    def _discover(self, root: Path) -> Dataset:
        files = [
            SourceFile(sat, mask_of(sat), scene=sat.name.removesuffix("_sat.jpg"))
            for sat in sorted(root.rglob("*_sat.jpg"))
        ]
        if not files:
            raise DataError(
                root, "no DeepGlobe images (expected <id>_sat.jpg beside <id>_mask.png, or in images/ with masks/)"
            )
        return Dataset(self, root, DEEPGLOBE, files)

    def band_names(self, count: int) -> tuple[str, ...]:
        return RGB_BANDS

    def check_image(self, path: Path, image: DatasetReader) -> None:
        if image.count != len(RGB_BANDS):
            raise DataError(path, f"has {image.count} bands; DeepGlobe images are RGB")

    def read_mask(self, file: SourceFile, labels: DatasetReader | None, window: Window) -> np.ndarray:
        labels, label_path = self.label_file(file, labels)
        if labels.count < 3:
            raise DataError(label_path, f"has {labels.count} bands; DeepGlobe masks are RGB")
        return decode_mask(read_window(labels, label_path, window, [1, 2, 3]), label_path)


def mask_of(sat: Path) -> Path:
    """The mask of an image: beside it (release), else in the `masks/` folder beside its `images/`."""
    name = sat.name.removesuffix("_sat.jpg") + "_mask.png"
    beside = sat.with_name(name)
    if beside.exists() or sat.parent.name != "images":
        return beside
    return sat.parent.with_name("masks") / name


def _lookup() -> np.ndarray:
    """Class id of each thresholded colour code r*4 + g*2 + b; -1 for a colour of no class."""
    lookup = np.full(8, -1, dtype=np.int16)
    for class_id, colour in enumerate(DEEPGLOBE.colors):
        lookup[_colour_code(colour)] = class_id
    lookup[_colour_code(DEEPGLOBE_UNKNOWN_COLOR)] = IGNORE_INDEX
    return lookup


def _colour_code(colour: tuple[int, int, int]) -> int:
    red, green, blue = (int(value >= 128) for value in colour)
    return red * 4 + green * 2 + blue


_LOOKUP = _lookup()


def decode_mask(rgb: np.ndarray, path: str | Path) -> np.ndarray:
    """(3, H, W) mask colours -> DEEPGLOBE ids (Unknown -> 255), thresholding each channel at 128
    as the release's impure colours need; DataError for colours that match no class."""
    high = rgb >= 128
    codes = high[0] * 4 + high[1] * 2 + high[2]
    ids = _LOOKUP[codes]
    wrong = ids < 0
    if wrong.any():
        row, col = np.argwhere(wrong)[0]
        raise DataError(
            path,
            f"{int(wrong.sum())} pixels have a colour that is no DeepGlobe class, e.g. "
            f"{tuple(int(v) for v in rgb[:, row, col])} at row {row}, column {col}",
        )
    distance = np.abs(rgb.astype(np.int16) - np.where(high, 255, 0)).max(axis=0)
    far_share = float((distance >= FAR).mean())
    if far_share > MAX_FAR_SHARE:
        raise DataError(
            path,
            f"{far_share:.1%} of pixels are far from every DeepGlobe class colour; is this a DeepGlobe mask?",
        )
    return ids.astype(np.uint8)
