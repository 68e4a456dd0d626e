"""Seeded episode samplers on real generated tiles: classification, sparse and dense segmentation.

Samplers are built on one split's rows with a TileCache of the whole index, as the protocol
does, and every image an episode holds is traced back to its tile to check its labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from geo.classes import IGNORE_INDEX
from geo.index import read_index
from geo.sources import index_source
from geo.sources.sen12ms import Sen12ms
from pipeline.regions import build_regions
from tasks.crops import Crop, CroppedSampler, label_windows, random_windows
from tasks.episodes import (
    ClassificationSampler,
    DenseSegmentationSampler,
    Episode,
    EpisodeError,
    SceneSampler,
    SegmentationSampler,
    TileCache,
    capable_regions,
    episode_rng,
    fewer_shots,
    sample_episodes,
)


@dataclass
class Indexed:
    frame: pd.DataFrame
    names: tuple[str, ...]
    tiles: TileCache

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]

    def tile_of(self, rows: pd.DataFrame) -> dict[bytes, int]:
        """Image bytes -> index label, for tracing an episode's images back to their tiles."""
        images = self.tiles.images(rows.index.to_numpy())
        lookup = {image.tobytes(): int(label) for image, label in zip(images, rows.index)}
        assert len(lookup) == len(rows)  # every tile's pixels are distinct
        return lookup


def _load(path) -> Indexed:
    frame, metadata = read_index(path)
    frame = frame.reset_index(drop=True)
    return Indexed(frame, tuple(metadata["scheme"]["names"]), TileCache(frame, index_source(metadata)))


@pytest.fixture(scope="module")
def sen12ms(sen12ms_index, tmp_path_factory) -> Indexed:
    out = tmp_path_factory.mktemp("episodes") / "sen12ms.parquet"
    return _load(build_regions(sen12ms_index, out, split=(0.5, 0.25, 0.25), seed=0).index_path)


@pytest.fixture(scope="module")
def deepglobe(deepglobe_index, tmp_path_factory) -> Indexed:
    out = tmp_path_factory.mktemp("episodes") / "deepglobe.parquet"
    return _load(build_regions(deepglobe_index, out, by="kmeans", seed=0).index_path)


def trace(data: Indexed, rows: pd.DataFrame, images: np.ndarray) -> list[int]:
    lookup = data.tile_of(rows)
    return [lookup[image.tobytes()] for image in images]


def relabel(masks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = np.full(masks.shape, IGNORE_INDEX, dtype=np.int64)
    for label, cls in enumerate(classes):
        out[masks == cls] = label
    return out


def same(a: Episode, b: Episode) -> bool:
    return (
        a.region == b.region
        and np.array_equal(a.classes, b.classes)
        and all(
            np.array_equal(getattr(a, name), getattr(b, name))
            for name in ("support_images", "support_labels", "query_images", "query_labels")
        )
    )


# --- classification --------------------------------------------------------------------------


def test_classification_episodes_hold_n_classes_times_k_items_of_one_region(sen12ms):
    rows = sen12ms.split("test")
    assert rows.index.min() > 0 or rows.index.max() < len(sen12ms.frame) - 1  # not the whole index
    n_way, k_shot, q_queries = 3, 2, 3
    sampler = ClassificationSampler(
        rows, sen12ms.tiles, n_way=n_way, k_shot=k_shot, q_queries=q_queries, class_names=sen12ms.names
    )
    regions = sorted(rows["region"].unique())
    episodes = list(sample_episodes(sampler, regions, 8, seed=1))
    assert {episode.region for episode in episodes} == set(regions)
    for episode in episodes:
        region_rows = rows[rows["region"] == episode.region]
        per_class = region_rows["majority_class"].value_counts()
        assert len(episode.classes) == n_way and np.all(np.diff(episode.classes) > 0)
        assert all(per_class[c] >= k_shot + q_queries for c in episode.classes)
        assert episode.support_images.shape == (n_way * k_shot, 13, 32, 32)
        assert episode.support_images.dtype == np.float32 and episode.support_labels.dtype == np.int64
        assert np.bincount(episode.support_labels).tolist() == [k_shot] * n_way
        assert np.bincount(episode.query_labels).tolist() == [q_queries] * n_way
        support = trace(sen12ms, region_rows, episode.support_images)
        query = trace(sen12ms, region_rows, episode.query_images)  # KeyError: a tile of elsewhere
        assert not set(support) & set(query) and len(set(support + query)) == len(support + query)
        majority = sen12ms.frame["majority_class"]
        assert (majority[support].to_numpy() == episode.classes[episode.support_labels]).all()
        assert (majority[query].to_numpy() == episode.classes[episode.query_labels]).all()


def test_same_seed_gives_identical_episodes_across_sampler_instances(sen12ms):
    def episodes(seed: int, count: int) -> list[Episode]:
        fresh = TileCache(sen12ms.frame, Sen12ms())  # a new cache and sampler each time: nothing shared
        rows = sen12ms.split("train")
        sampler = SegmentationSampler(rows, fresh, n_way=3, k_shot=4, query_tiles=2)
        return list(sample_episodes(sampler, sorted(rows["region"].unique()), count, seed=seed))

    first, again = episodes(5, 6), episodes(5, 6)
    assert all(same(a, b) for a, b in zip(first, again))
    assert all(same(a, b) for a, b in zip(first[:3], episodes(5, 3)))  # episode i depends on i only
    other = episodes(6, 6)
    assert not all(same(a, b) for a, b in zip(first, other))

    rows = sen12ms.split("train")
    make = lambda: ClassificationSampler(rows, TileCache(sen12ms.frame, Sen12ms()), n_way=2, k_shot=3, q_queries=2)  # noqa: E731
    region = sorted(rows["region"].unique())[0]
    a = make().sample(region, episode_rng(9, region, 4))
    b = make().sample(region, episode_rng(9, region, 4))
    c = make().sample(region, episode_rng(9, region, 5))
    assert same(a, b) and not same(a, c)


# --- segmentation ----------------------------------------------------------------------------


def test_sparse_segmentation_labels_k_pixels_per_class_and_dense_queries(sen12ms):
    rows = sen12ms.split("val")
    n_way, k_shot = 3, 7
    sampler = SegmentationSampler(rows, sen12ms.tiles, n_way=n_way, k_shot=k_shot, query_tiles=2)
    for episode in sample_episodes(sampler, sorted(rows["region"].unique()), 6, seed=2):
        region_rows = rows[rows["region"] == episode.region]
        assert episode.sparse_support and len(episode.classes) == n_way
        labels = episode.support_labels
        assert labels.shape == (*episode.support_images.shape[:1], 32, 32) and labels.dtype == np.int64
        assert 1 <= len(labels) <= n_way
        assert [(labels == label).sum() for label in range(n_way)] == [k_shot] * n_way
        assert (labels[labels >= n_way] == IGNORE_INDEX).all()
        support = trace(sen12ms, region_rows, episode.support_images)
        query = trace(sen12ms, region_rows, episode.query_images)
        assert len(query) == 2 and not set(support) & set(query)
        truth = relabel(sen12ms.tiles.masks(support), episode.classes)
        labelled = labels != IGNORE_INDEX
        assert (labels[labelled] == truth[labelled]).all()  # labelled pixels carry their true class
        assert np.array_equal(episode.query_labels, relabel(sen12ms.tiles.masks(query), episode.classes))
        assert (episode.query_labels != IGNORE_INDEX).any()


def test_dense_deepglobe_episodes_hold_k_fully_labelled_tiles(deepglobe):
    rows = deepglobe.split("train")
    k_shot = 3
    sampler = DenseSegmentationSampler(rows, deepglobe.tiles, k_shot=k_shot, query_tiles=2, class_names=deepglobe.names)
    episodes = list(sample_episodes(sampler, sorted(rows["region"].unique()), 4, seed=0))
    for episode in episodes:
        region_rows = rows[rows["region"] == episode.region]
        assert episode.support_images.shape == (k_shot, 3, 32, 32)
        assert episode.support_labels.shape == (k_shot, 32, 32) and not episode.sparse_support
        support = trace(deepglobe, region_rows, episode.support_images)
        query = trace(deepglobe, region_rows, episode.query_images)
        assert len(query) == 2 and not set(support) & set(query)
        masks = deepglobe.tiles.masks(support + query)
        present = np.unique(masks[masks != IGNORE_INDEX])
        assert np.array_equal(episode.classes, present)
        assert np.array_equal(episode.support_labels, relabel(masks[:k_shot], episode.classes))
        assert np.array_equal(episode.query_labels, relabel(masks[k_shot:], episode.classes))
        assert (episode.support_labels != IGNORE_INDEX).mean() > 0.9  # whole tiles labelled


# --- regions that cannot supply an episode -----------------------------------------------------


def test_region_short_of_classes_gets_an_error_naming_region_and_classes(sen12ms):
    rows = sen12ms.split("train")
    region = sorted(rows["region"].unique())[0]
    counts = rows.loc[rows["region"] == region, "majority_class"].value_counts()
    k_shot, q_queries = 3, 8
    enough = sorted(int(c) for c, n in counts.items() if n >= k_shot + q_queries)
    short = sorted(int(c) for c, n in counts.items() if n < k_shot + q_queries)
    assert enough and short  # the generated region has both kinds of class at this size

    fits = ClassificationSampler(rows, sen12ms.tiles, n_way=len(enough), k_shot=k_shot, q_queries=q_queries)
    assert fits.sample(region, episode_rng(0, region, 0)).classes.tolist() == enough

    sampler = ClassificationSampler(
        rows, sen12ms.tiles, n_way=len(enough) + 1, k_shot=k_shot, q_queries=q_queries, class_names=sen12ms.names
    )
    with pytest.raises(EpisodeError) as error:
        sampler.sample(region, episode_rng(0, region, 0))
    message = str(error.value)
    assert f"region {region}" in message and f"needs {len(enough) + 1} classes" in message
    for cls in short:
        assert f"{sen12ms.names[cls]} ({counts[cls]})" in message.split("short:")[1]
    for cls in enough:
        assert sen12ms.names[cls] in message.split("short:")[0]
    assert region not in capable_regions(sampler, [region])

    greedy = ClassificationSampler(rows, sen12ms.tiles, n_way=11, k_shot=1, q_queries=1, class_names=sen12ms.names)
    regions = sorted(rows["region"].unique())
    assert capable_regions(greedy, regions) == []
    with pytest.raises(EpisodeError, match="no region can supply an episode") as none:
        list(sample_episodes(greedy, regions, 1, seed=0))
    assert all(f"region {name}" in str(none.value) for name in regions)


def test_segmentation_shortfalls_name_region_and_classes(sen12ms, deepglobe):
    rows = sen12ms.split("test")
    region = sorted(rows["region"].unique())[0]
    too_many_pixels = SegmentationSampler(rows, sen12ms.tiles, n_way=2, k_shot=32 * 32 + 1, class_names=sen12ms.names)
    with pytest.raises(EpisodeError, match=f"region {region} needs 2 classes") as error:
        too_many_pixels.sample(region, episode_rng(0, region, 0))
    present = rows.loc[rows["region"] == region, "majority_class"].unique()
    assert all(sen12ms.names[c] in str(error.value) for c in present)

    dg = deepglobe.split("test")
    dg_region = dg["region"].iloc[0]
    too_many_tiles = DenseSegmentationSampler(
        dg, deepglobe.tiles, k_shot=len(dg), query_tiles=2, class_names=deepglobe.names
    )
    with pytest.raises(EpisodeError, match=f"region {dg_region} has {len(dg)} tiles, needs {len(dg) + 2}"):
        too_many_tiles.sample(dg_region, episode_rng(0, dg_region, 0))
    with pytest.raises(EpisodeError, match="region elsewhere"):
        too_many_pixels.sample("elsewhere", episode_rng(0, "elsewhere", 0))


# --- fewer shots ------------------------------------------------------------------------------


def _subset(small: np.ndarray, large: np.ndarray) -> bool:
    pool = {image.tobytes() for image in large}
    return all(image.tobytes() in pool for image in small)


def test_fewer_shots_nests_supports_and_keeps_queries(sen12ms, deepglobe):
    rows = sen12ms.split("train")
    region = sorted(rows["region"].unique())[1]
    rng = lambda: episode_rng(3, region, 0)  # noqa: E731

    classification = ClassificationSampler(rows, sen12ms.tiles, n_way=2, k_shot=5, q_queries=3).sample(region, rng())
    cuts = {k: fewer_shots(classification, k, seed=0) for k in (0, 1, 2, 5, 9)}
    for k, cut in cuts.items():
        assert np.bincount(cut.support_labels, minlength=2).tolist() == [min(k, 5)] * 2
        assert np.array_equal(cut.query_images, classification.query_images)
        assert np.array_equal(cut.query_labels, classification.query_labels)
    assert cuts[0].support_images.shape == (0, 13, 32, 32)
    for small, large in ((1, 2), (2, 5)):
        assert _subset(cuts[small].support_images, cuts[large].support_images)
        for label in range(2):  # and with its labels
            assert _subset(
                cuts[small].support_images[cuts[small].support_labels == label],
                cuts[large].support_images[cuts[large].support_labels == label],
            )
    assert same(cuts[5], classification)

    sparse = SegmentationSampler(rows, sen12ms.tiles, n_way=3, k_shot=10).sample(region, rng())
    pixel_cuts = {k: fewer_shots(sparse, k, seed=4) for k in (1, 3, 10)}
    for k, cut in pixel_cuts.items():
        assert [(cut.support_labels == label).sum() for label in range(3)] == [k] * 3
        assert np.array_equal(cut.support_images, sparse.support_images)
        assert np.array_equal(cut.query_labels, sparse.query_labels)
    for small, large in ((1, 3), (3, 10)):
        kept = pixel_cuts[small].support_labels != IGNORE_INDEX
        assert (pixel_cuts[small].support_labels[kept] == pixel_cuts[large].support_labels[kept]).all()
    assert np.array_equal(pixel_cuts[10].support_labels, sparse.support_labels)

    dg = deepglobe.split("train")
    dense = DenseSegmentationSampler(dg, deepglobe.tiles, k_shot=4).sample(dg["region"].iloc[0], rng())
    one, two = fewer_shots(dense, 1), fewer_shots(dense, 2)
    assert len(one.support_images) == 1 and len(two.support_images) == 2
    assert _subset(one.support_images, two.support_images) and _subset(two.support_images, dense.support_images)
    assert np.array_equal(one.query_labels, dense.query_labels) and np.array_equal(one.classes, dense.classes)
    with pytest.raises(ValueError, match="shots"):
        fewer_shots(dense, -1)


def test_tile_cache_reads_tiles_by_index_label(sen12ms):
    rows = sen12ms.split("test")
    labels = rows.index.to_numpy()[[0, 5, -1]]
    images, masks = sen12ms.tiles.images(labels), sen12ms.tiles.masks(labels)
    counts = np.stack([np.bincount(mask[mask != IGNORE_INDEX], minlength=10) for mask in masks])
    assert np.array_equal(counts, np.stack(rows.loc[labels, "class_counts"].map(np.asarray)))
    subset_cache = TileCache(rows, Sen12ms())  # a cache of the split only names tiles the same way
    assert np.array_equal(subset_cache.images(labels), images)
    assert sen12ms.tiles.images([]).shape == (0, 13, 32, 32)
    with pytest.raises(ValueError, match="unique index"):
        TileCache(pd.concat([rows.head(2), rows.head(2)]), Sen12ms())


# --- scene-like episodes -----------------------------------------------------------------------


def scene_rows(data: Indexed, split: str) -> pd.DataFrame:
    """A split's rows with one region per SEN12MS scene id: two acquisitions (seasons) each."""
    return data.split(split).assign(region=lambda rows: rows["scene"].astype(str))


def interior(masks: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood inside the tile is all of their own value."""
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)), mode="edge")
    height, width = masks.shape[1:]
    return np.all([padded[:, r : r + height, c : c + width] == masks for r in range(3) for c in range(3)], axis=0)


def test_scene_episodes_label_k_spread_pixels_of_every_class_of_one_acquisition(sen12ms):
    rows = scene_rows(sen12ms, "val")
    k_shot, max_tiles = 4, 12
    sampler = SceneSampler(rows, sen12ms.tiles, k_shot=k_shot, max_tiles=max_tiles, class_names=sen12ms.names)
    acquisitions: set[tuple[str, str]] = set()
    for episode in sample_episodes(sampler, sorted(rows["region"].unique()), 6, seed=0):
        region_rows = rows[rows["region"] == episode.region]
        assert region_rows[["season", "scene"]].drop_duplicates().shape[0] == 2
        query = trace(sen12ms, region_rows, episode.query_images)
        assert len(query) == len(set(query)) == max_tiles
        drawn = {tuple(pair) for pair in rows.loc[query, ["season", "scene"]].to_numpy()}
        assert len(drawn) == 1
        acquisitions |= drawn
        masks = sen12ms.tiles.masks(query)
        counts = np.bincount(masks[masks != IGNORE_INDEX], minlength=len(sen12ms.names))
        assert episode.classes.tolist() == np.flatnonzero(counts > k_shot).tolist()
        n_way = len(episode.classes)
        assert episode.sparse_support and n_way >= 2

        # the support: the query tiles holding a support pixel, K true labels per class
        support = trace(sen12ms, region_rows, episode.support_images)
        labels = episode.support_labels
        assert set(support) <= set(query) and (labels != IGNORE_INDEX).any(axis=(1, 2)).all()
        assert [(labels == label).sum() for label in range(n_way)] == [k_shot] * n_way
        truth = relabel(sen12ms.tiles.masks(support), episode.classes)
        labelled = labels != IGNORE_INDEX
        assert (labels[labelled] == truth[labelled]).all()
        for label in range(n_way):  # round-robin: as many tiles as the class's pixels allow
            holders = int((relabel(masks, episode.classes) == label).any(axis=(1, 2)).sum())
            assert len(np.unique(np.nonzero(labels == label)[0])) == min(k_shot, holders)
        # away from class edges: a pixel on an edge only where its tile has no unused inner one
        inner = interior(truth)
        for tile, row, col in zip(*np.nonzero(labelled & ~inner)):
            same_class = truth[tile] == labels[tile, row, col]
            assert not (same_class & inner[tile] & ~labelled[tile]).any()
        assert (labelled & inner).sum() > labelled.sum() // 2  # the sample data has inner pixels

        # the queries: every labelled pixel of the episode's classes but the support pixels
        expected = relabel(masks, episode.classes)
        for position, tile in enumerate(support):
            expected[query.index(tile)][labelled[position]] = IGNORE_INDEX
        assert np.array_equal(episode.query_labels, expected)
        assert (episode.query_labels != IGNORE_INDEX).sum() == counts[episode.classes].sum() - n_way * k_shot
    assert len(acquisitions) == 2  # both seasons of the region were drawn, never mixed


def test_scene_episodes_are_a_function_of_the_rng_and_cut_to_fewer_shots(sen12ms):
    rows = scene_rows(sen12ms, "val")
    region = sorted(rows["region"].unique())[0]
    make = lambda: SceneSampler(rows, TileCache(sen12ms.frame, Sen12ms()), k_shot=5, max_tiles=8)  # noqa: E731
    a = make().sample(region, episode_rng(1, region, 0))
    b = make().sample(region, episode_rng(1, region, 0))
    c = make().sample(region, episode_rng(1, region, 1))
    assert same(a, b) and not same(a, c)

    for shots in (1, 3):
        cut = fewer_shots(a, shots, seed=2)
        assert [(cut.support_labels == label).sum() for label in range(len(a.classes))] == [shots] * len(a.classes)
        kept = cut.support_labels != IGNORE_INDEX
        assert (cut.support_labels[kept] == a.support_labels[kept]).all()
        assert np.array_equal(cut.support_images, a.support_images)
        assert np.array_equal(cut.query_labels, a.query_labels) and np.array_equal(cut.classes, a.classes)


def test_scene_draw_always_holds_two_classes_even_when_few_tiles_could(sen12ms):
    rows = scene_rows(sen12ms, "val")
    region = sorted(rows["region"].unique())[0]
    k_shot = 1000  # only nearly pure tiles hold K + 1 pixels of a class
    counts = np.stack([np.asarray(counts) for counts in rows["class_counts"]])
    rich = counts > k_shot
    pairs = rich[:, None, :] | rich[None, :, :]  # what two tiles hold, pixel counts aside
    assert (pairs.sum(axis=2) >= 2).mean() < 0.5  # most random pairs of tiles would not do
    sampler = SceneSampler(rows, sen12ms.tiles, k_shot=k_shot, max_tiles=2)
    for number in range(10):
        episode = sampler.sample(region, episode_rng(0, region, number))
        assert len(episode.query_images) == 2 and len(episode.classes) >= 2
        assert [(episode.support_labels == label).sum() for label in range(len(episode.classes))] == [k_shot] * len(
            episode.classes
        )


def test_scene_shortfall_names_the_region_and_its_classes(sen12ms, deepglobe):
    rows = scene_rows(sen12ms, "val")
    regions = sorted(rows["region"].unique())
    greedy = SceneSampler(rows, sen12ms.tiles, k_shot=32 * 32, class_names=sen12ms.names)
    assert capable_regions(greedy, regions) == []
    message = greedy.shortfall(regions[0])
    assert message is not None and f"region {regions[0]} has no scene (2 in it)" in message
    present = np.flatnonzero(np.stack([np.asarray(counts) for counts in rows["class_counts"]]).sum(axis=0))
    assert all(sen12ms.names[c] in message for c in present)
    with pytest.raises(EpisodeError, match=f"region {regions[0]} "):
        greedy.sample(regions[0], episode_rng(0, regions[0], 0))
    with pytest.raises(EpisodeError, match="no region can supply an episode"):
        list(sample_episodes(greedy, regions, 1, seed=0))
    assert SceneSampler(rows, sen12ms.tiles, k_shot=4).shortfall("elsewhere") == (
        "region elsewhere is not in this sampler's tiles"
    )

    # other sources: a region is one scene, its tiles drawn across its images
    dg = deepglobe.split("train")
    dg_region = dg["region"].value_counts().index[0]
    region_rows = dg[dg["region"] == dg_region]
    assert region_rows["scene"].nunique() > 1
    episode = SceneSampler(dg, deepglobe.tiles, k_shot=4, max_tiles=16).sample(dg_region, episode_rng(0, dg_region, 0))
    drawn = trace(deepglobe, region_rows, episode.query_images)
    assert len(drawn) == min(16, len(region_rows)) and dg.loc[drawn, "scene"].nunique() > 1


# --- cropped episodes (meta-training on windows, not whole tiles) --------------------------------

CROP = Crop(size=16, support_window=8)
"""Windows smaller than the sample data's 32 px tiles, so that cutting happens."""


def labelled_pixels(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    """(the pixel's band values, its label) of every labelled pixel, sorted: a window's labelled
    pixels are found in it wherever it was cut from."""
    tile, row, col = np.nonzero(labels != IGNORE_INDEX)
    return sorted((images[t, :, r, c].tobytes(), int(labels[t, r, c])) for t, r, c in zip(tile, row, col))


def window_of(tiles: np.ndarray, window: np.ndarray) -> tuple[int, int, int]:
    """(tile, row, col) where `window` (C, h, w) was cut from one of `tiles` (B, C, H, W)."""
    height, width = window.shape[1:]
    for tile, image in enumerate(tiles):
        for row in range(image.shape[1] - height + 1):
            for col in range(image.shape[2] - width + 1):
                if np.array_equal(image[:, row : row + height, col : col + width], window):
                    return tile, row, col
    raise AssertionError("a window that is in none of the tiles")


def relabel_to(episode: Episode, classes: np.ndarray) -> Episode:
    """The episode with its labels on `classes` (a superset of its own, in the same order)."""
    lookup = np.full(IGNORE_INDEX + 1, IGNORE_INDEX, dtype=np.int64)
    lookup[: len(episode.classes)] = np.searchsorted(classes, episode.classes)
    return dataclasses.replace(
        episode,
        classes=classes,
        support_labels=lookup[episode.support_labels],
        query_labels=lookup[episode.query_labels],
    )


def check_queries(whole: Episode, cropped: Episode, size: int) -> None:
    """Each query window is a window of its own query tile, with that tile's labels there."""
    assert cropped.query_images.shape == (len(whole.query_images), whole.query_images.shape[1], size, size)
    assert cropped.query_labels.shape == (len(whole.query_images), size, size)
    for number, (image, labels) in enumerate(zip(cropped.query_images, cropped.query_labels)):
        tile, row, col = window_of(whole.query_images[number : number + 1], image)
        assert tile == 0
        assert np.array_equal(labels, whole.query_labels[number, row : row + size, col : col + size])
        # a window without labels teaches nothing: one holds labels wherever its tile does
        assert (labels != IGNORE_INDEX).any() == (whole.query_labels[number] != IGNORE_INDEX).any()


@pytest.mark.parametrize("kind", ["segmentation", "scene"])
def test_cropped_sparse_episodes_keep_every_labelled_support_pixel_in_windows_around_them(sen12ms, kind):
    rows = sen12ms.split("val") if kind == "segmentation" else scene_rows(sen12ms, "val")
    sampler: SegmentationSampler | SceneSampler = (
        SegmentationSampler(rows, sen12ms.tiles, n_way=3, k_shot=6, query_tiles=2)
        if kind == "segmentation"
        else SceneSampler(rows, sen12ms.tiles, k_shot=5, max_tiles=6)
    )
    cropper = CroppedSampler(sampler, CROP)
    assert cropper.regions() == sampler.regions()
    for region in sorted(rows["region"].unique()):
        assert cropper.shortfall(region) == sampler.shortfall(region)
        for number in range(3):
            whole = sampler.sample(region, episode_rng(0, region, number))
            cropped = cropper.sample(region, episode_rng(0, region, number))
            assert cropped.sparse_support and np.array_equal(cropped.classes, whole.classes)
            labels = cropped.support_labels
            assert cropped.support_images.shape[1:] == (13, 8, 8) and labels.shape[1:] == (8, 8)
            # every labelled pixel, in exactly one window; every window holds labels
            assert [(labels == label).sum() for label in range(len(whole.classes))] == [
                (whole.support_labels == label).sum() for label in range(len(whole.classes))
            ]
            assert labelled_pixels(cropped.support_images, labels) == labelled_pixels(
                whole.support_images, whole.support_labels
            )
            assert (labels != IGNORE_INDEX).any(axis=(1, 2)).all()
            assert len(labels) <= (labels != IGNORE_INDEX).sum()  # at most one window per label
            for image in cropped.support_images:
                window_of(whole.support_images, image)  # cut from a support tile, inside it
            check_queries(whole, cropped, CROP.size)


def test_support_windows_are_a_grid_whose_cells_keep_their_own_labels_at_tile_edges():
    rng = np.random.default_rng(0)
    labels = np.full((2, 40, 36), IGNORE_INDEX, dtype=np.int64)
    corners = [(0, 0, 0), (0, 39, 35), (0, 39, 0), (0, 0, 35), (1, 20, 17), (1, 21, 18), (1, 5, 30)]
    for number, (tile, row, col) in enumerate(corners):
        labels[tile, row, col] = number % 3
    images = rng.random((2, 2, 40, 36)).astype(np.float32)
    for seed in range(20):
        windows, cut = label_windows(images, labels, 16, np.random.default_rng(seed))
        assert windows.shape[1:] == (2, 16, 16) and cut.shape[1:] == (16, 16)
        assert labelled_pixels(windows, cut) == labelled_pixels(images, labels)
        assert (cut != IGNORE_INDEX).any(axis=(1, 2)).all()
        assert len(cut) <= len(corners)
    # tiles no larger than the window are one window each, whole
    windows, cut = label_windows(images, labels, 64, rng)
    assert np.array_equal(windows, images) and np.array_equal(cut, labels)
    empty, none = label_windows(images, np.full_like(labels, IGNORE_INDEX), 16, rng)
    assert empty.shape == (0, 2, 16, 16) and none.shape == (0, 16, 16)


def test_random_windows_hold_labelled_pixels_when_a_candidate_does():
    labels = np.full((3, 64, 64), IGNORE_INDEX, dtype=np.int64)
    labels[:, :12, :12] = 1
    labels[:, 4:8, 4:8] = 2
    images = np.arange(3 * 64 * 64, dtype=np.float32).reshape(3, 1, 64, 64)
    for seed in range(20):
        windows, cut = random_windows(images, labels, 32, np.random.default_rng(seed), candidates=32)
        assert windows.shape == (3, 1, 32, 32) and (cut != IGNORE_INDEX).any(axis=(1, 2)).all()
        assert all((window_of(images[tile : tile + 1], windows[tile])[0] == 0) for tile in range(3))
    draw, again = (random_windows(images, labels, 32, np.random.default_rng(5))[0] for _ in range(2))
    assert np.array_equal(draw, again)
    # a side no larger than the window stays whole
    windows, cut = random_windows(images[:, :, :24], labels[:, :24], 32, np.random.default_rng(0))
    assert windows.shape == (3, 1, 24, 32) and cut.shape == (3, 24, 32)


def test_cropped_dense_episodes_cut_support_and_queries_and_classification_stays_whole(sen12ms, deepglobe):
    rows = deepglobe.split("train")
    sampler = DenseSegmentationSampler(rows, deepglobe.tiles, k_shot=3, query_tiles=2)
    region = sorted(rows["region"].unique())[0]
    for number in range(3):
        whole = sampler.sample(region, episode_rng(1, region, number))
        cropped = CroppedSampler(sampler, CROP).sample(region, episode_rng(1, region, number))
        assert not cropped.sparse_support and set(cropped.classes) <= set(whole.classes)
        # back on the whole episode's labels, the classes the windows hold, and only those
        back = relabel_to(cropped, whole.classes)
        held = np.union1d(cropped.support_labels, cropped.query_labels)
        assert np.array_equal(cropped.classes, whole.classes[held[held != IGNORE_INDEX]])
        assert cropped.support_images.shape == (3, 3, 16, 16) and cropped.support_labels.shape == (3, 16, 16)
        for number_in_support, image in enumerate(cropped.support_images):
            tile, row, col = window_of(whole.support_images, image)
            assert tile == number_in_support
            assert np.array_equal(back.support_labels[tile], whole.support_labels[tile, row : row + 16, col : col + 16])
        check_queries(whole, back, CROP.size)

    classification = ClassificationSampler(sen12ms.split("train"), sen12ms.tiles, n_way=2, k_shot=2, q_queries=2)
    region = sorted(sen12ms.split("train")["region"].unique())[0]
    a = classification.sample(region, episode_rng(0, region, 0))
    b = CroppedSampler(classification, CROP).sample(region, episode_rng(0, region, 0))
    assert same(a, b)


def test_cropped_episodes_are_a_function_of_the_rng_and_tiles_no_larger_stay_whole(sen12ms):
    rows = sen12ms.split("train")
    regions = sorted(rows["region"].unique())

    def episodes(seed: int, crop: Crop) -> list[Episode]:
        fresh = TileCache(sen12ms.frame, Sen12ms())  # nothing shared between the two draws
        sampler = SegmentationSampler(rows, fresh, n_way=3, k_shot=4, query_tiles=2)
        return list(sample_episodes(CroppedSampler(sampler, crop), regions, 6, seed=seed))

    first, again, other = episodes(3, CROP), episodes(3, CROP), episodes(4, CROP)
    assert all(same(a, b) for a, b in zip(first, again))
    assert not all(same(a, b) for a, b in zip(first, other))
    whole = list(sample_episodes(SegmentationSampler(rows, sen12ms.tiles, n_way=3, k_shot=4), regions, 6, seed=3))
    untouched = episodes(3, Crop(size=32, support_window=32))  # the sample data's 32 px tiles
    assert all(same(a, b) for a, b in zip(whole, untouched))
    with pytest.raises(ValueError, match="at least 1"):
        Crop(size=0)
