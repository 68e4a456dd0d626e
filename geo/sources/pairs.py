"""A team's own data: image rasters with label rasters of the same name on the same grid.

Layout::

    ROOT/images/<name>.tif     any bands (13 Sentinel-2 bands are named B1..B12), georeferenced
    ROOT/labels/<name>.tif     band 1: integer label values, same CRS, transform and size

with a classes file given to ingest with `--classes` (YAML or JSON), e.g. for ESA WorldCover::

    classes:
      - {value: 10, name: Tree cover, color: "#006400"}
      - {value: 40, name: Cropland, color: [240, 150, 255]}
    ignore: [0]            # label values of unlabelled pixels (255 is always ignored)

Class ids follow the order of the list. A label value neither listed nor ignored, a label raster
on another grid than its image, and an image or label without its partner are errors naming the
file. The classes are stored in the index, so later steps need no classes file. Each image is
cut into `--grid` x `--grid` tiles and is one scene: a region by metadata is one image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geo.classes import IGNORE_INDEX, ClassScheme
from geo.errors import DataError
from geo.readers import read_window
from geo.sources.base import Dataset, Source, SourceFile, region_names
from geo.validation import problems

SUFFIXES = (".tif", ".tiff")
Colour = tuple[int, int, int]


class ClassEntry(BaseModel):
    """One class of a classes file: the label value that marks it, its name and display colour."""

    model_config = ConfigDict(extra="forbid")
    value: Annotated[int, Field(ge=0, le=65535)]
    name: Annotated[str, Field(min_length=1)]
    color: Colour

    @field_validator("name")
    @classmethod
    def _not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("is blank")
        return name.strip()

    @field_validator("color", mode="before")
    @classmethod
    def _hex(cls, colour: Any) -> Any:
        """'#rrggbb' as well as [r, g, b]."""
        if isinstance(colour, str):
            text = colour.removeprefix("#")
            if len(text) != 6:
                raise ValueError(f"colour {colour!r} is not #rrggbb or [r, g, b]")
            try:
                return tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))
            except ValueError:
                raise ValueError(f"colour {colour!r} is not #rrggbb or [r, g, b]") from None
        return colour

    @field_validator("color")
    @classmethod
    def _in_range(cls, colour: Colour) -> Colour:
        if not all(0 <= channel <= 255 for channel in colour):
            raise ValueError(f"colour {list(colour)} has a channel outside 0..255")
        return colour


class ClassesFile(BaseModel):
    """A classes file: the classes in id order and the label values of unlabelled pixels."""

    model_config = ConfigDict(extra="forbid")
    classes: Annotated[list[ClassEntry], Field(min_length=2)]
    ignore: list[Annotated[int, Field(ge=0, le=65535)]] | Annotated[int, Field(ge=0, le=65535)] = []

    def ignored(self) -> tuple[int, ...]:
        values = [self.ignore] if isinstance(self.ignore, int) else self.ignore
        return tuple(sorted({*values, IGNORE_INDEX}))


@dataclass(frozen=True)
class Pairs(Source):
    """`ROOT/images/*.tif` with `ROOT/labels/*.tif` of the same names; classes from a classes file."""

    values: tuple[int, ...]
    """Label value of each class id."""
    class_names: tuple[str, ...]
    colors: tuple[Colour, ...]
    ignore: tuple[int, ...] = (IGNORE_INDEX,)

    name: ClassVar[str] = "pairs"
    takes_classes: ClassVar[bool] = True
    cut_into_grid: ClassVar[bool] = True
    kmeans_unit: ClassVar[str | None] = "scene"

    def __post_init__(self) -> None:
        repeated = sorted({value for value in self.values if self.values.count(value) > 1})
        if repeated:
            raise ValueError(f"label value(s) {', '.join(map(str, repeated))} name more than one class")
        both = sorted(set(self.values) & set(self.ignore))
        if both:
            raise ValueError(f"label value(s) {', '.join(map(str, both))} are both a class and ignored")
        names = [name.casefold() for name in self.class_names]
        twice = sorted({name for name in self.class_names if names.count(name.casefold()) > 1})
        if twice:
            raise ValueError(f"class name(s) {', '.join(twice)} appear more than once")

    @classmethod
    def configure(cls, classes: Path | None = None) -> Source:
        if classes is None:
            raise ValueError("the pairs source needs a classes file (--classes FILE: values, names, colours)")
        return read_classes(classes)

    @property
    def scheme(self) -> ClassScheme:
        return ClassScheme("pairs", self.class_names, self.colors)

    def _discover(self, root: Path) -> Dataset:
        images, labels = root / "images", root / "labels"
        found = {path.relative_to(images): path for path in _rasters(images)}
        if not found:
            raise DataError(root, "no images (expected images/<name>.tif with labels/<name>.tif)")
        partners = {path.relative_to(labels): path for path in _rasters(labels)}
        problems = [
            DataError(path, f"has no label raster (expected {labels / name})")
            for name, path in found.items()
            if name not in partners
        ]
        problems += [
            DataError(path, f"has no image (expected {images / name})")
            for name, path in partners.items()
            if name not in found
        ]
        files = [
            SourceFile(path, partners[name], scene=name.with_suffix("").as_posix())
            for name, path in sorted(found.items())
            if name in partners
        ]
        if not files:
            raise DataError(root, f"no image has its label raster; first problem: {problems[0]}")
        return Dataset(self, root, self.scheme, files, problems)

    def check_labels(self, file: SourceFile, image: DatasetReader, labels: DatasetReader) -> None:
        """Labels must lie on the image's grid: same CRS, transform and size."""
        super().check_labels(file, image, labels)
        if labels.crs != image.crs or not labels.transform.almost_equals(image.transform):
            raise DataError(
                labels.name,
                f"lies on another grid than its image {file.path.name} (CRS {labels.crs} and transform "
                f"{tuple(labels.transform)[:6]}, image: CRS {image.crs} and {tuple(image.transform)[:6]})",
            )

    def read_mask(self, file: SourceFile, labels: DatasetReader | None, window: Window) -> np.ndarray:
        """Label values as class ids in the classes file's order; ignored values as 255."""
        labels, label_path = self.label_file(file, labels)
        values = read_window(labels, label_path, window, 1)
        if values.dtype.kind not in "ui":
            raise DataError(label_path, f"holds {values.dtype} values; labels must be integers")
        known = np.array([*self.values, *self.ignore])
        ids = np.array([*range(len(self.values)), *[IGNORE_INDEX] * len(self.ignore)], dtype=np.uint8)
        order = np.argsort(known)
        position = np.clip(np.searchsorted(known[order], values), 0, len(known) - 1)
        unknown = known[order][position] != values
        if unknown.any():
            shown = ", ".join(str(int(value)) for value in np.unique(values[unknown])[:8])
            raise DataError(
                label_path,
                f"holds label value(s) {shown} that are neither a class nor ignored in the classes file "
                f"(classes: {', '.join(map(str, self.values))}; ignored: {', '.join(map(str, self.ignore))})",
            )
        return ids[order][position]

    def regions(self, frame: pd.DataFrame) -> pd.Series:
        """One region per image."""
        return region_names(frame["scene"], "column 'scene' (the image)")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Source:
        """From JSON lists back to the tuples the fields hold."""
        return cls(
            tuple(settings["values"]),
            tuple(settings["class_names"]),
            tuple((int(r), int(g), int(b)) for r, g, b in settings["colors"]),
            tuple(settings["ignore"]),
        )


def read_classes(path: Path) -> Pairs:
    """The pairs source a classes file describes; DataError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such classes file")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DataError(path, f"is not a YAML or JSON classes file ({error})") from None
    try:
        parsed = ClassesFile.model_validate(content)
        return Pairs(
            tuple(entry.value for entry in parsed.classes),
            tuple(entry.name for entry in parsed.classes),
            tuple(entry.color for entry in parsed.classes),
            parsed.ignored(),
        )
    except ValidationError as error:
        raise DataError(path, problems(error.errors(), ClassesFile)) from None
    except ValueError as error:
        raise DataError(path, str(error)) from None


def _rasters(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()) if folder.is_dir() else []
    )
