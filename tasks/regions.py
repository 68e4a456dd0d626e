"""Regions: the unit of a few-shot task, from the data's metadata or, where it has none, KMeans.

A region is a place (and time) whose tiles share an appearance. Each source says what its
metadata offers (`geo.sources.base.Source.regions`): SEN12MS one region per (season, scene),
EuroSAT-style folders one per UTM zone (the EPSG code of the patch); DeepGlobe has no metadata,
so its regions are clusters of *images* in a space of per-band statistics, as the authors did for
its "clustered split": every tile of an image gets its image's region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from geo.atomic import atomic_output
from geo.progress import progress_bar
from geo.sources.base import Source, region_names

K_RANGE = (2, 10)
"""The k tried when none is given; the one of best silhouette score wins."""


def regions_by_metadata(frame: pd.DataFrame, source: Source, column: str | None = None) -> pd.Series:
    """Region names from metadata: a named column, else the source's natural unit of place
    (`Source.regions`: a SEN12MS (season, scene), a UTM zone of class folders, a pairs image).

    Raises ValueError naming the problem (no such column, rows without a value, no metadata).
    """
    if column is not None:
        if column not in frame.columns:
            columns = ", ".join(map(str, frame.columns))
            raise ValueError(f"no column {column!r} in the index; columns: {columns}")
        return region_names(frame[column], f"column {column!r}")
    return source.regions(frame)


@dataclass
class KMeansRegions:
    """Cluster assignments plus what is needed to reproduce and inspect them.

    KMeans clusters *units*: tiles, or groups of tiles (e.g. the tiles of one DeepGlobe image)
    represented by their mean features; `labels` holds every row's cluster, its unit's.
    """

    labels: np.ndarray
    """Cluster of every row (tile), shape (rows,); clusters numbered by first appearance."""
    k: int
    centres: np.ndarray
    """Cluster centres in standardised feature space, shape (k, features)."""
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    unit: str = "tile"
    """What was clustered: `tile`, or the index column whose rows were clustered together."""
    units: int = 0
    seed: int = 0

    def names(self) -> pd.Series:
        return pd.Series([f"cluster-{label:02d}" for label in self.labels], name="region", dtype=object)

    def metadata(self) -> dict:
        """JSON-ready description saved with the index (the assignments are its `region` column)."""
        return {
            "method": "kmeans",
            "k": self.k,
            "unit": self.unit,
            "units": self.units,
            "seed": self.seed,
            "region_names": [f"cluster-{label:02d}" for label in range(self.k)],
            "centres": self.centres.round(6).tolist(),
            "feature_mean": self.feature_mean.round(6).tolist(),
            "feature_scale": self.feature_scale.round(6).tolist(),
            "silhouette_by_k": {str(k): round(v, 6) for k, v in self.silhouette_by_k.items()},
        }


def tile_features(frame: pd.DataFrame) -> np.ndarray:
    """The per-tile spectral statistics the index computed at ingest, as a matrix."""
    if "features" not in frame.columns or frame.empty:
        raise ValueError("the index holds no tile features; write it with `landcover ingest`")
    return np.stack([np.asarray(values, dtype=np.float64) for values in frame["features"]])


def regions_by_kmeans(
    features: np.ndarray,
    *,
    k: int | None = None,
    k_range: tuple[int, int] = K_RANGE,
    seed: int = 0,
    groups: Sequence | np.ndarray | pd.Series | None = None,
    unit: str | None = None,
    progress: bool = False,
) -> KMeansRegions:
    """Cluster standardised features; with no k, pick the k of best silhouette in `k_range`
    (`progress`: a bar over the k tried; silhouettes of many tiles take a while).

    With `groups` (one value per row, e.g. the DeepGlobe image id), the rows of a group are one
    unit: KMeans sees each group's mean features and every row gets its group's cluster.
    Seeded: the same features and seed give the same clusters, numbered by first appearance.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or not len(features):
        raise ValueError("no features to cluster")
    if not np.isfinite(features).all():
        raise ValueError("some tile features are not finite (NaN or infinite)")
    if groups is None:
        unit_features, row_unit = features, np.arange(len(features))
    else:
        keys = pd.Series(np.asarray(groups, dtype=object))
        if keys.isna().any():
            raise ValueError(f"{int(keys.isna().sum())} rows have no value in the grouping column")
        row_unit, _ = pd.factorize(keys, sort=True)
        unit_features = pd.DataFrame(features).groupby(row_unit, sort=True).mean().to_numpy()
    count = len(unit_features)
    what = "tiles" if groups is None else f"{unit or 'groups'} values"

    scaler = StandardScaler().fit(unit_features)
    standardised = scaler.transform(unit_features)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)

    def fit(clusters: int) -> KMeans:
        return KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(standardised)

    silhouettes: dict[int, float] = {}
    if k is None:
        largest = min(k_range[1], count - 1)
        if largest < k_range[0]:
            raise ValueError(f"{count} {what} are too few to choose k in {k_range[0]}..{k_range[1]}; give k")
        fits: dict[int, KMeans] = {}
        tried = range(k_range[0], largest + 1)
        with progress_bar(len(tried), f"choose k ({count} {what})", unit="k values", enabled=progress) as bar:
            for clusters in tried:
                bar.set_postfix_str(f"k={clusters}", refresh=False)
                fits[clusters] = fit(clusters)
                silhouettes[clusters] = float(silhouette_score(standardised, fits[clusters].labels_))
                bar.update()
        k = max(silhouettes, key=silhouettes.__getitem__)
        model = fits[k]
    else:
        if not 1 <= k <= count:
            raise ValueError(f"k={k} must be between 1 and the number of {what} ({count})")
        model = fit(k)
    # number clusters by first appearance: names do not depend on KMeans' internal order
    _, first = np.unique(model.labels_, return_index=True)
    order = np.argsort(first)  # order[new] = old
    renumber = np.empty(k, dtype=np.int64)
    renumber[order] = np.arange(k)
    unit_labels = renumber[model.labels_]
    return KMeansRegions(
        labels=unit_labels[row_unit].astype(np.int64),
        k=int(k),
        centres=model.cluster_centers_[order],
        feature_mean=scaler.mean_,
        feature_scale=scale,
        silhouette_by_k=silhouettes,
        unit="tile" if groups is None else (unit or "group"),
        units=count,
        seed=seed,
    )


def plot_regions(features: np.ndarray, regions: pd.Series, path: Path) -> Path:
    """A PNG of the tiles in their first two principal components, coloured by region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    features = np.asarray(features, dtype=np.float64)
    standardised = StandardScaler().fit_transform(features)
    components = min(2, *standardised.shape)
    projected = PCA(n_components=components, random_state=0).fit_transform(standardised)
    if projected.shape[1] < 2:
        projected = np.column_stack([projected, np.zeros((len(projected), 2 - projected.shape[1]))])
    codes, names = pd.factorize(pd.Series(regions).astype(str), sort=True)
    figure, axes = plt.subplots(figsize=(6, 5), dpi=120)
    colormap, norm = matplotlib.colormaps["tab20"], Normalize(vmin=0, vmax=max(len(names) - 1, 1))
    axes.scatter(projected[:, 0], projected[:, 1], c=codes, cmap=colormap, norm=norm, s=12)
    axes.set_xlabel("principal component 1")
    axes.set_ylabel("principal component 2")
    axes.set_title(f"{len(features)} tiles in {len(names)} regions")
    if len(names) <= 20:
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color=colormap(norm(code))) for code in range(len(names))
        ]
        axes.legend(handles, names, fontsize=6, loc="best", title="region")
    figure.tight_layout()
    try:
        with atomic_output(Path(path)) as tmp:
            figure.savefig(tmp, format="png")
    finally:
        plt.close(figure)
    return Path(path)
