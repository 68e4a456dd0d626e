"""Class schemes of the supported datasets and the code maps between them.

One place for class names, colours and label codes, so readers, the generator, the evaluation
report and the GIS exports all agree on what class id 3 means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255
"""Label value for unlabelled or unknown pixels, and the nodata value of exported class rasters."""

S2_BANDS: tuple[str, ...] = (
    "B1",
    "B2",
    "B3",
    "B4",
    "B5",
    "B6",
    "B7",
    "B8",
    "B8A",
    "B9",
    "B10",
    "B11",
    "B12",
)
S1_BANDS: tuple[str, ...] = ("VV", "VH")
RGB_BANDS: tuple[str, ...] = ("red", "green", "blue")


@dataclass(frozen=True)
class ClassScheme:
    """Names and display colours of a dataset's classes; class id = position in `names`."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(f"{self.name}: {len(self.names)} names but {len(self.colors)} colours")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def class_id(self, name: str) -> int:
        """The id of a class name, matched case-insensitively; ValueError lists the valid names."""
        wanted = name.strip().casefold()
        for class_id, candidate in enumerate(self.names):
            if candidate.casefold() == wanted:
                return class_id
        raise ValueError(f"unknown class {name!r}; valid classes: {', '.join(self.names)}")


DFC10 = ClassScheme(
    name="dfc10",
    names=(
        "Forest",
        "Shrubland",
        "Savanna",
        "Grassland",
        "Wetlands",
        "Croplands",
        "Urban/Built-up",
        "Snow/Ice",
        "Barren",
        "Water",
    ),
    colors=(
        (0, 153, 0),
        (198, 176, 68),
        (251, 255, 19),
        (182, 255, 5),
        (39, 255, 135),
        (255, 218, 90),
        (194, 79, 68),
        (105, 255, 248),
        (249, 255, 164),
        (28, 13, 255),
    ),
)
"""Simplified IGBP classes used with SEN12MS (the DFC2020 scheme, 0-based)."""

IGBP_TO_DFC10 = np.full(256, IGNORE_INDEX, dtype=np.uint8)
"""Lookup table: `IGBP_TO_DFC10[igbp_code]` is the DFC-10 class id (255 for codes outside 1-17)."""
for _codes, _class_id in (
    ((1, 2, 3, 4, 5), 0),
    ((6, 7), 1),
    ((8, 9), 2),
    ((10,), 3),
    ((11,), 4),
    ((12, 14), 5),
    ((13,), 6),
    ((15,), 7),
    ((16,), 8),
    ((17,), 9),
):
    IGBP_TO_DFC10[list(_codes)] = _class_id

DEEPGLOBE = ClassScheme(
    name="deepglobe",
    names=("Urban", "Agriculture", "Rangeland", "Forest", "Water", "Barren"),
    colors=((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255)),
)
"""DeepGlobe land-cover classes; a mask colour is its class colour. Unknown (0,0,0) is ignored."""
DEEPGLOBE_UNKNOWN_COLOR = (0, 0, 0)

EUROSAT_CLASSES: tuple[str, ...] = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)
"""Folder names of the EuroSAT release; a folder dataset takes its classes from its own folders."""


def default_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours for a scheme read from folder names, which carries no colours of its own."""
    import colorsys

    def rgb(hue: float) -> tuple[int, int, int]:
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
        return round(255 * red), round(255 * green), round(255 * blue)

    return tuple(rgb(i / max(count, 1)) for i in range(count))


def folder_scheme(names: list[str] | tuple[str, ...]) -> ClassScheme:
    """A scheme for a class-folder dataset: classes in sorted folder-name order."""
    ordered = tuple(sorted(names))
    return ClassScheme(name="folder", names=ordered, colors=default_palette(len(ordered)))


SCHEMES = {scheme.name: scheme for scheme in (DFC10, DEEPGLOBE)}
