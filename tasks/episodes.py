"""Seeded few-shot episode samplers: one region, a few labelled support items, scored queries.

Three kinds, as in the paper: classification (N-way K-shot with Q queries per class, the label of
a tile being its majority class), sparse segmentation (K labelled pixels per class on support
tiles, dense query tiles) and DeepGlobe-style dense segmentation (K fully labelled support tiles);
and scene-like episodes (`SceneSampler`: every class of one acquisition, K spread-out labelled
pixels each, as `landcover adapt` builds its support), for validation that carries over to adapt.

Every episode relabels its classes 0..N-1 in the order of `Episode.classes` (the global class ids),
so a model with one head over all classes restricts its logits to `logits[:, classes]`.
An episode is a pure function of (seed, region, episode number): every method is scored on the
same episodes.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from functools import lru_cache
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt
import pandas as pd

from geo.classes import IGNORE_INDEX
from geo.readers import load_tile
from geo.sources.base import Source


class EpisodeError(ValueError):
    """A region cannot supply the episode asked for; the message names region and classes."""


@dataclasses.dataclass(frozen=True)
class Episode:
    """One few-shot task; labels are 0..N-1 in the order of `classes`, 255 = ignore."""

    region: str
    classes: np.ndarray
    support_images: np.ndarray
    support_labels: np.ndarray
    query_images: np.ndarray
    query_labels: np.ndarray
    sparse_support: bool = False
    """True when the support holds a few labelled pixels per class rather than whole labels."""


class TileCache:
    """Scaled pixels of an index's tiles, loaded once: episodes revisit the same tiles often.

    Tiles are named by the index labels of `frame` (its row positions after
    `reset_index(drop=True)`, as `pipeline.protocol.load_split_index` gives). A sampler built
    on a subset of `frame` (one split's rows) keeps those labels, so it finds the right tiles.
    """

    def __init__(self, frame: pd.DataFrame, source: Source, max_tiles: int = 4096) -> None:
        if not frame.index.is_unique:
            raise ValueError("TileCache needs a frame with unique index labels (reset_index first)")
        if frame.empty:
            raise ValueError("TileCache needs at least one tile")
        self._rows, self.source = frame, source
        self._load = lru_cache(maxsize=max_tiles)(self._load_label)

    def _load_label(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        tile = load_tile(self._rows.loc[label], self.source)
        return tile.image, tile.mask

    def _get(self, label: int | np.integer) -> tuple[np.ndarray, np.ndarray]:
        return self._load(label.item() if isinstance(label, np.generic) else label)

    def _first(self) -> tuple[np.ndarray, np.ndarray]:
        return self._get(self._rows.index[0])

    def images(self, positions: Sequence[int] | npt.NDArray[np.integer]) -> np.ndarray:
        """float32 (B, C, H, W) of the tiles with these index labels."""
        return _stack([self._get(p)[0] for p in positions], lambda: self._first()[0].shape, np.float32)

    def masks(self, positions: Sequence[int] | npt.NDArray[np.integer]) -> np.ndarray:
        """uint8 (B, H, W) class ids (255 = ignore) of the tiles with these index labels."""
        return _stack([self._get(p)[1] for p in positions], lambda: self._first()[1].shape, np.uint8)


def _stack(arrays: list[np.ndarray], shape: Callable[[], tuple[int, ...]], dtype: type) -> np.ndarray:
    """np.stack that also gives an empty (0, ...) array for a 0-shot support set."""
    return np.stack(arrays).astype(dtype, copy=False) if arrays else np.zeros((0, *shape()), dtype)


def episode_rng(seed: int, region: str, number: int) -> np.random.Generator:
    """The generator of episode `number` of `region`: stable across runs, methods and processes."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(region.encode()), number]))


class Sampler(Protocol):
    def regions(self) -> list[str]: ...

    def shortfall(self, region: str) -> str | None: ...

    def sample(self, region: str, rng: np.random.Generator) -> Episode: ...


def _require(sampler: Sampler, region: str) -> None:
    """Raise EpisodeError with the sampler's explanation when `region` cannot supply an episode."""
    problem = sampler.shortfall(region)
    if problem:
        raise EpisodeError(problem)


def _relabel(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Global class ids -> 0..N-1 in the order of `classes`; anything else -> IGNORE_INDEX."""
    lookup = np.full(256, IGNORE_INDEX, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    return lookup[labels.astype(np.int64)]


def _class_name(class_id: int, class_names: Sequence[str] | None) -> str:
    return class_names[class_id] if class_names is not None else str(class_id)


def _describe(counts: dict[int, int], class_names: Sequence[str] | None) -> str:
    return ", ".join(f"{_class_name(c, class_names)} ({n})" for c, n in counts.items()) or "none"


class ClassificationSampler:
    """N-way K-shot episodes of whole tiles labelled by their majority class.

    `frame` is any subset of the rows `tiles` was built on (e.g. one split): its index labels
    name the tiles. Classes are drawn among those with at least K + Q tiles in the region.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        tiles: TileCache,
        *,
        n_way: int,
        k_shot: int,
        q_queries: int,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.n_way, self.k_shot, self.q_queries = n_way, k_shot, q_queries
        if min(n_way, k_shot + q_queries) < 1 or min(k_shot, q_queries) < 0:
            raise ValueError(f"bad episode shape: {n_way}-way {k_shot}-shot with {q_queries} queries")
        self.tiles, self.class_names = tiles, class_names
        self._all_regions = sorted(str(region) for region in frame["region"].unique())
        labelled = frame[frame["majority_class"] >= 0]
        # per region and class, the index labels of its tiles (the TileCache's keys)
        self._items: dict[str, dict[int, np.ndarray]] = {
            str(region): {int(cls): group.index.to_numpy() for cls, group in rows.groupby("majority_class")}
            for region, rows in labelled.groupby("region")
        }

    def regions(self) -> list[str]:
        return sorted(self._items)

    def _eligible(self, region: str) -> list[int]:
        need = self.k_shot + self.q_queries
        return sorted(c for c, items in self._items.get(region, {}).items() if len(items) >= need)

    def shortfall(self, region: str) -> str | None:
        """Why `region` cannot supply an episode, or None when it can."""
        eligible = self._eligible(region)
        if len(eligible) >= self.n_way:
            return None
        need = self.k_shot + self.q_queries
        if region not in self._items:
            where = "has no labelled tiles" if region in self._all_regions else "is not in this sampler's tiles"
            return f"region {region} {where}; it cannot supply a {self.n_way}-way episode"
        counts = {c: len(items) for c, items in self._items[region].items()}
        short = {c: n for c, n in counts.items() if n < need}
        return (
            f"region {region} needs {self.n_way} classes with at least {need} tiles each "
            f"({self.k_shot} support + {self.q_queries} query); enough: "
            f"{_describe({c: counts[c] for c in eligible}, self.class_names)}; "
            f"short: {_describe(short, self.class_names)}"
        )

    def disjoint_episodes(self, region: str) -> int:
        """How many episodes of `region` can be drawn without reusing a tile."""
        need = self.k_shot + self.q_queries
        sizes = sorted((len(items) for items in self._items.get(region, {}).values()), reverse=True)
        if len(sizes) < self.n_way or need == 0:
            return 0
        total, per_class = 0, [size // need for size in sizes]
        while sum(1 for value in per_class if value > 0) >= self.n_way:
            per_class.sort(reverse=True)
            for index in range(self.n_way):
                per_class[index] -= 1
            total += 1
        return total

    def sample(self, region: str, rng: np.random.Generator) -> Episode:
        _require(self, region)
        classes = np.sort(rng.choice(self._eligible(region), size=self.n_way, replace=False))
        support: list[int] = []
        query: list[int] = []
        for cls in classes:
            # queries first, then the support in a random order: the support of a smaller k is a
            # prefix of a larger one's and the queries do not change with k
            order = rng.permutation(self._items[region][int(cls)])
            query.extend(order[: self.q_queries])
            support.extend(order[self.q_queries : self.q_queries + self.k_shot])
        return Episode(
            region=region,
            classes=classes.astype(np.int64),
            support_images=self.tiles.images(support),
            support_labels=np.repeat(np.arange(self.n_way), self.k_shot).astype(np.int64),
            query_images=self.tiles.images(query),
            query_labels=np.repeat(np.arange(self.n_way), self.q_queries).astype(np.int64),
        )


class _SegmentationBase:
    """Shared bookkeeping of segmentation samplers: tiles per region and their class pixels.

    Row positions of `frame` are used internally; `_keys` turns them into the index labels that
    name the tiles in `tiles` (`frame` may be one split's rows of the cached index).
    """

    def __init__(self, frame: pd.DataFrame, tiles: TileCache, class_names: Sequence[str] | None) -> None:
        self.tiles, self.class_names = tiles, class_names
        self._keys = frame.index.to_numpy()
        """Index label (TileCache key) of each row position."""
        self._counts = (
            np.stack([np.asarray(c, dtype=np.int64) for c in frame["class_counts"]])
            if len(frame)
            else np.zeros((0, len(class_names or ())), np.int64)
        )
        self._tiles_of: dict[str, np.ndarray] = {
            str(region): np.asarray(positions, dtype=np.int64)
            for region, positions in frame.groupby("region").indices.items()
        }

    def _images(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.tiles.images(self._keys[np.asarray(positions, dtype=np.int64)])

    def _masks(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.tiles.masks(self._keys[np.asarray(positions, dtype=np.int64)])

    def regions(self) -> list[str]:
        return sorted(self._tiles_of)

    def _tiles_with(self, region: str, minimum_pixels: int) -> dict[int, np.ndarray]:
        """Per class: the tiles of `region` holding at least `minimum_pixels` of it."""
        positions = self._tiles_of.get(region, np.zeros(0, np.int64))
        counts = self._counts[positions]
        return {
            cls: positions[counts[:, cls] >= max(minimum_pixels, 1)]
            for cls in range(counts.shape[1])
            if (counts[:, cls] >= max(minimum_pixels, 1)).any()
        }


class SegmentationSampler(_SegmentationBase):
    """Sparse-label segmentation episodes: K labelled pixels per class, dense query tiles.

    Classes are drawn among those that at least two tiles of the region hold (one to label,
    one to score) and that one tile holds K pixels of. Support tiles (at most N) are added until
    every class has K candidate pixels; exactly K of each class are labelled, the rest of the
    support is IGNORE_INDEX. Query tiles are other tiles of the region, densely labelled.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        tiles: TileCache,
        *,
        n_way: int,
        k_shot: int,
        query_tiles: int = 2,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if n_way < 1 or k_shot < 1 or query_tiles < 1:
            raise ValueError(f"bad episode shape: {n_way}-way, {k_shot} pixels per class, {query_tiles} query tiles")
        super().__init__(frame, tiles, class_names)
        self.n_way, self.k_shot, self.query_tiles = n_way, k_shot, query_tiles

    def _eligible(self, region: str) -> list[int]:
        holders = self._tiles_with(region, 1)
        enough = self._tiles_with(region, self.k_shot)
        return sorted(c for c, tiles in holders.items() if len(tiles) >= 2 and c in enough)

    def shortfall(self, region: str) -> str | None:
        eligible = self._eligible(region)
        tiles = len(self._tiles_of.get(region, ()))
        # the support takes at most one tile per class: the queries always find enough tiles
        need_tiles = self.n_way + self.query_tiles
        if len(eligible) >= self.n_way and tiles >= need_tiles:
            return None
        if region not in self._tiles_of:
            return f"region {region} is not in this sampler's tiles"
        holders = {c: len(t) for c, t in self._tiles_with(region, 1).items()}
        short = {c: n for c, n in holders.items() if c not in eligible}
        return (
            f"region {region} needs {self.n_way} classes present in at least 2 tiles, one with "
            f"{self.k_shot} pixels to label, and at least {need_tiles} tiles (has {tiles}); enough: "
            f"{_describe({c: holders[c] for c in eligible}, self.class_names)}; "
            f"short (tiles holding it): {_describe(short, self.class_names)}"
        )

    def sample(self, region: str, rng: np.random.Generator) -> Episode:
        _require(self, region)
        classes = np.sort(rng.choice(self._eligible(region), size=self.n_way, replace=False))
        with_enough = self._tiles_with(region, self.k_shot)
        support_tiles: list[int] = []
        for cls in rng.permutation(classes):
            if not set(support_tiles) & set(with_enough[int(cls)].tolist()):
                support_tiles.append(int(rng.choice(with_enough[int(cls)])))
        support_tiles = sorted(set(support_tiles))
        rest = np.setdiff1d(self._tiles_of[region], support_tiles)
        query_tiles = np.sort(rng.choice(rest, size=self.query_tiles, replace=False))
        dense_support = _relabel(self._masks(support_tiles), classes)
        sparse_labels = np.full_like(dense_support, IGNORE_INDEX)
        for label in range(len(classes)):
            candidates = np.flatnonzero(dense_support == label)
            chosen = rng.choice(candidates, size=min(self.k_shot, len(candidates)), replace=False)
            sparse_labels.flat[chosen] = label
        return Episode(
            region=region,
            classes=classes.astype(np.int64),
            support_images=self._images(support_tiles),
            support_labels=sparse_labels,
            query_images=self._images(query_tiles),
            query_labels=_relabel(self._masks(query_tiles), classes),
            sparse_support=True,
        )


class DenseSegmentationSampler(_SegmentationBase):
    """DeepGlobe-style episodes: K fully labelled support tiles and Q query tiles of one region.

    The episode's classes are those present in its tiles; the support is in a random order, so
    `fewer_shots` keeps a random subset of it.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        tiles: TileCache,
        *,
        k_shot: int,
        query_tiles: int = 2,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if k_shot < 0 or query_tiles < 1:
            raise ValueError(f"bad episode shape: {k_shot} support tiles, {query_tiles} query tiles")
        super().__init__(frame, tiles, class_names)
        self.k_shot, self.query_tiles = k_shot, query_tiles

    def shortfall(self, region: str) -> str | None:
        count = len(self._tiles_of.get(region, []))
        need = self.k_shot + self.query_tiles
        if count >= need:
            return None
        present = {c: len(t) for c, t in self._tiles_with(region, 1).items()}
        return (
            f"region {region} has {count} tiles, needs {need} ({self.k_shot} support + "
            f"{self.query_tiles} query); classes present: {_describe(present, self.class_names)}"
        )

    def sample(self, region: str, rng: np.random.Generator) -> Episode:
        _require(self, region)
        order = rng.permutation(self._tiles_of[region])
        query = np.sort(order[: self.query_tiles])
        support = order[self.query_tiles : self.query_tiles + self.k_shot]
        present = self._counts[np.concatenate([support, query])].sum(axis=0)
        classes = np.flatnonzero(present > 0).astype(np.int64)
        if not len(classes):
            raise EpisodeError(f"region {region}: the drawn tiles hold no labelled pixel")
        return Episode(
            region=region,
            classes=classes,
            support_images=self._images(support),
            support_labels=_relabel(self._masks(support), classes),
            query_images=self._images(query),
            query_labels=_relabel(self._masks(query), classes),
        )


class SceneSampler(_SegmentationBase):
    """Scene-like sparse segmentation episodes, built the way `landcover adapt` builds its support.

    `adapt` maps a new scene from K labelled points per class: every class of the scene is
    present, the points are spread over the scene, support windows (grid cells) hold only their
    own cell's labels and the map is scored on every other pixel. Validation on N-way episodes of
    a few small tiles does not resemble that, so a fine-tuning budget picked on them does not carry
    over; episodes of this sampler do. One acquisition of the region is drawn (the source's
    `acquisitions`: a SEN12MS (season, scene); any other source's region is one), then up to `max_tiles` of its
    tiles. The classes are all those with K + 1 labelled pixels over the tiles; K of each are
    labelled, spread over as many tiles as possible (round-robin), preferring pixels whose 3x3
    neighbourhood is of the same class, as a careful labeller would. Each tile holding a support
    pixel is one support window (a grid cell of adapt, tile size = window size); the queries are
    all the drawn tiles, labelled everywhere but on the support pixels.

    A scene qualifies when two classes each have K + 1 pixels within one tile: then a draw always
    holds two classes (when the first `max_tiles` tiles of the random order do not, one such
    tile of each of the first two classes met in that order is moved to its front).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        tiles: TileCache,
        *,
        k_shot: int,
        max_tiles: int = 16,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if k_shot < 1 or max_tiles < 2:
            raise ValueError(f"bad episode shape: {k_shot} pixels per class, at most {max_tiles} tiles")
        super().__init__(frame, tiles, class_names)
        self.k_shot, self.max_tiles = k_shot, max_tiles
        acquisition = tiles.source.acquisitions(frame)
        self._scenes: dict[str, list[np.ndarray]] = {}
        """Per region, the row positions of each acquisition."""
        # pandas-stubs give `indices` Hashable keys; grouped by two keys, they are (region, acquisition)
        groups = cast(
            "dict[tuple[str, Hashable], np.ndarray]",
            frame.groupby([frame["region"].astype(str), acquisition.to_numpy()]).indices,
        )
        for (region, _), positions in sorted(groups.items()):
            self._scenes.setdefault(region, []).append(np.asarray(positions, dtype=np.int64))

    def _rich(self, positions: np.ndarray) -> np.ndarray:
        """(tiles, classes) bool: the tile holds K + 1 pixels of the class."""
        return self._counts[positions] > self.k_shot

    def _qualifies(self, positions: np.ndarray) -> bool:
        return int((self._rich(positions).any(axis=0)).sum()) >= 2

    def shortfall(self, region: str) -> str | None:
        scenes = self._scenes.get(region)
        if scenes is None:
            return f"region {region} is not in this sampler's tiles"
        if any(self._qualifies(scene) for scene in scenes):
            return None
        most = self._counts[self._tiles_of[region]].max(axis=0)
        return (
            f"region {region} has no scene ({len(scenes)} in it) with 2 classes of at least "
            f"{self.k_shot + 1} labelled pixels in one tile ({self.k_shot} support + 1 query); "
            f"most pixels of a class in one tile: "
            f"{_describe({c: int(n) for c, n in enumerate(most) if n}, self.class_names)}"
        )

    def _draw_tiles(self, scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        order = rng.permutation(scene)
        if not self._qualifies(order[: self.max_tiles]):
            rich = self._rich(order)
            first = np.where(rich.any(axis=0), rich.argmax(axis=0), len(order))  # per class
            anchors = np.unique(np.sort(first)[:2])
            order = np.concatenate([order[anchors], np.delete(order, anchors)])
        return np.sort(order[: self.max_tiles])

    def sample(self, region: str, rng: np.random.Generator) -> Episode:
        _require(self, region)
        scenes = [scene for scene in self._scenes[region] if self._qualifies(scene)]
        chosen = self._draw_tiles(scenes[int(rng.integers(len(scenes)))], rng)
        classes = np.flatnonzero(self._counts[chosen].sum(axis=0) > self.k_shot).astype(np.int64)
        dense = _relabel(self._masks(chosen), classes)
        support = np.full_like(dense, IGNORE_INDEX)
        for label in range(len(classes)):
            support.flat[_spread_pixels(dense, label, self.k_shot, rng)] = label
        holds = (support != IGNORE_INDEX).any(axis=(1, 2))
        return Episode(
            region=region,
            classes=classes,
            support_images=self._images(chosen[holds]),
            support_labels=support[holds],
            query_images=self._images(chosen),
            query_labels=np.where(support == IGNORE_INDEX, dense, IGNORE_INDEX),
            sparse_support=True,
        )


def _spread_pixels(labels: np.ndarray, label: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of `count` pixels of `label` in `labels` (tiles, H, W), dealt round-robin over
    the tiles holding it (in a random order), inside each tile pixels whose 3x3 neighbourhood is
    all `label` first (a careful labeller keeps away from class edges), then at random."""
    same = np.pad(labels == label, ((0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = labels.shape[1:]
    interior = np.logical_and.reduce([same[:, r : r + height, c : c + width] for r in range(3) for c in range(3)])
    pixels = np.flatnonzero(labels == label)
    tile = pixels // (height * width)
    # within each tile: interior pixels first, then a random order; rank = place in its tile
    within = np.lexsort((rng.random(len(pixels)), ~interior.flat[pixels], tile))
    rank = np.empty(len(pixels), dtype=np.int64)
    starts = np.searchsorted(tile[within], tile[within])
    rank[within] = np.arange(len(pixels)) - starts
    turn = rng.permutation(len(labels))[tile]  # the tiles' order in each round
    return pixels[np.lexsort((turn, rank))[:count]]


def fewer_shots(episode: Episode, shots: int, *, seed: int = 0) -> Episode:
    """The same episode with only `shots` support items (or labelled pixels) per class.

    Evaluation draws each episode once at the largest shot count and cuts it down, so every
    shot count is scored on the same queries and a smaller support is a subset of a larger one.
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    labels = episode.support_labels
    if labels.ndim == 1:  # classification: keep the first `shots` items of each class
        keep = np.concatenate(
            [np.flatnonzero(labels == label)[:shots] for label in range(len(episode.classes))]
        ).astype(np.int64)
        keep.sort()
        return _replace_support(episode, episode.support_images[keep], labels[keep])
    if not episode.sparse_support:  # dense tiles: keep the first tiles
        return _replace_support(episode, episode.support_images[:shots], labels[:shots])
    order = np.random.default_rng(seed).permutation(labels.size)
    flat = labels.reshape(-1)
    sparse = np.full_like(flat, IGNORE_INDEX)
    for label in range(len(episode.classes)):
        kept = order[flat[order] == label][:shots]
        sparse[kept] = label
    return _replace_support(episode, episode.support_images, sparse.reshape(labels.shape))


def _replace_support(episode: Episode, images: np.ndarray, labels: np.ndarray) -> Episode:
    return dataclasses.replace(episode, support_images=images, support_labels=labels)


def capable_regions(sampler: Sampler, regions: Sequence[str]) -> list[str]:
    """The regions among `regions` that can supply an episode."""
    return [region for region in regions if sampler.shortfall(region) is None]


def sample_episodes(sampler: Sampler, regions: Sequence[str], count: int, *, seed: int) -> Iterator[Episode]:
    """`count` episodes cycling over the capable regions in a seeded order.

    Episode i depends only on (seed, its region, i): the same list for every method.
    Raises EpisodeError naming every region's shortfall when none can supply an episode.
    """
    capable = capable_regions(sampler, regions)
    if not capable:
        problems = "; ".join(sampler.shortfall(region) or "" for region in regions)
        raise EpisodeError(f"no region can supply an episode: {problems or 'no regions'}")
    order = np.random.default_rng(seed).permutation(len(capable))
    for number in range(count):
        region = capable[int(order[number % len(capable)])]
        yield sampler.sample(region, episode_rng(seed, region, number))
