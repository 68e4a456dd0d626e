"""The `regions` step: name each tile's region, split regions into train/val/test, save both."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml

from geo.atomic import check_output_file
from geo.errors import DataError
from geo.index import read_index, write_index
from geo.sources import index_source
from geo.sources.base import Source
from tasks.regions import plot_regions, regions_by_kmeans, regions_by_metadata, tile_features
from tasks.splits import SPLITS, split_by_fractions, split_explicit, split_groups

RegionMethod = Literal["metadata", "kmeans"]


@dataclass(frozen=True)
class RegionsSummary:
    """What the step wrote: the index, the plot (KMeans only) and regions/tiles per split."""

    index_path: Path
    plot_path: Path | None
    regions_per_split: dict[str, int]
    tiles_per_split: dict[str, int]
    k: int | None
    unit: str | None = None
    """KMeans: what was clustered (`tile`, or the column whose rows were clustered together)."""


def kmeans_unit(frame: pd.DataFrame, column: str | None, source: Source) -> str | None:
    """The column whose rows KMeans clusters as one unit: `column`, else the source's (the image
    id of DeepGlobe and pairs tiles, as the authors cluster whole images); None: single tiles."""
    if column is not None:
        return column
    if source.kmeans_unit is not None and source.kmeans_unit in frame.columns:
        return source.kmeans_unit
    return None


def build_regions(
    index_path: Path,
    out: Path,
    *,
    by: RegionMethod = "metadata",
    column: str | None = None,
    k: int | None = None,
    split: Sequence[float] | Mapping[str, Sequence[str]] = (0.6, 0.2, 0.2),
    seed: int = 0,
    root: Path | None = None,
    progress: bool = True,
) -> RegionsSummary:
    """Add `region` and `split` columns to the index at `index_path` and write it to `out`.

    `by="metadata"`: one region per value of `column`, else per SEN12MS (season, scene) or
    EuroSAT-style UTM zone. `by="kmeans"`: clusters of tile features (k given, or best
    silhouette); the rows sharing a value of `column` (default for DeepGlobe: the image id)
    are clustered as one unit. `split`: train/val/test fractions of region groups, or explicit
    lists of regions per split. Regions sharing a SEN12MS scene id always share a split.
    `root`: the dataset's folder when it is no longer where the index says (see `read_index`).
    `progress`: a bar over KMeans' search for k (stderr).
    """
    index_path, out = Path(index_path), Path(out)
    check_output_file(out, "--out")
    frame, metadata = read_index(index_path, root)
    source = index_source(metadata)
    plot_path: Path | None = None
    unit: str | None = None
    try:
        if by == "metadata":
            regions = regions_by_metadata(frame, source, column)
            description: dict[str, Any] = {"method": "metadata", "column": column}
        elif by == "kmeans":
            features = tile_features(frame)
            unit = kmeans_unit(frame, column, source)
            if unit is not None and unit not in frame.columns:
                raise ValueError(f"no column {unit!r} in the index to cluster by")
            clusters = regions_by_kmeans(
                features,
                k=k,
                seed=seed,
                groups=None if unit is None else frame[unit].to_numpy(dtype=object),
                unit=unit,
                progress=progress,
            )
            regions = clusters.names()
            description = clusters.metadata()
            unit = clusters.unit
            plot_path = out.with_suffix(".regions.png")
        else:
            raise ValueError(f"unknown region method {by!r}; use metadata or kmeans")
        regions.index = frame.index
        groups = split_groups(frame, regions, source.split_together)
        if isinstance(split, Mapping):
            splits = split_explicit(regions, split, groups)
            description["split"] = {name: sorted(map(str, split.get(name, ()))) for name in SPLITS}
        else:
            try:
                splits = split_by_fractions(groups, split, seed=seed)
            except ValueError as error:
                raise ValueError(str(error) + _merged_hint(regions, groups, by)) from None
            description["split"] = [float(value) for value in split]
    except ValueError as error:
        raise DataError(index_path, str(error)) from None
    frame = frame.assign(region=regions.to_numpy(), split=splits.to_numpy())
    description["seed"] = seed
    description["region_count"] = int(frame["region"].nunique())
    description["group_count"] = int(groups.nunique())
    metadata["regions"] = description
    write_index(frame, out, metadata)
    if plot_path is not None:
        plot_regions(features, frame["region"], plot_path)
    return RegionsSummary(
        index_path=out,
        plot_path=plot_path,
        regions_per_split=_count(frame.groupby("split")["region"].nunique()),
        tiles_per_split=_count(frame.groupby("split").size()),
        k=description.get("k"),
        unit=unit,
    )


def _merged_hint(regions: pd.Series, groups: pd.Series, by: str) -> str:
    """Why there are fewer groups than regions, when that is what left a split empty."""
    if groups.nunique() == regions.nunique():
        return ""
    hint = " (regions that share a SEN12MS scene id stay in one split"
    if by == "kmeans":
        hint += "; these clusters mix scene ids: cluster whole scenes with --column scene"
    return hint + ")"


def read_split_file(path: Path) -> dict[str, list[str]]:
    """Explicit region lists from YAML or JSON: a mapping of train/val/test to region names."""
    path = Path(path)
    try:
        text = path.read_text()
        document = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except OSError as error:
        raise DataError(path, f"cannot read the split file ({error.strerror or error})") from None
    except (ValueError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise DataError(path, f"is not valid {kind}: {error}") from None
    if not isinstance(document, Mapping):
        raise DataError(path, "must map train, val and test to lists of region names")
    lists: dict[str, list[str]] = {}
    for name, members in document.items():
        if name not in SPLITS:
            raise DataError(path, f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        if members is None:
            members = []
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
            raise DataError(path, f"split {name!r} must hold a list of region names")
        lists[str(name)] = [str(member) for member in members]
    return lists


def _count(series: pd.Series) -> dict[str, int]:
    return {name: int(series.get(name, 0)) for name in SPLITS}
