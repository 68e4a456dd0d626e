"""Windows cut from sampled episodes and pretraining batches: meta-training on crops, not whole tiles.

A 256 px patch costs a U-Net 64 times a 32 px one, and an episode's few labelled pixels or a
query's loss need nowhere near all of it. `Crop` says how episodes are cut:

* a sparse support (K labelled pixels per class: `SegmentationSampler`, `SceneSampler`) becomes
  windows of `support_window` px around its labelled pixels, cut the way `landcover adapt` cuts
  its support (`pipeline.adapt.cut_windows`): a grid of cells over each tile (here at a random
  phase, as a tile lies anywhere in a scene), one window per cell holding labels, moved back
  inside the tile at its edges, holding that cell's labels only. Every labelled pixel lands in
  exactly one window; none is lost;
* a query, a dense support (`DenseSegmentationSampler`) and a pretraining tile become one random
  window of `size` px each: of `candidates` windows around random labelled pixels of the tile
  (the episode's classes), the first holding labelled pixels of the most classes. A window
  without labels teaches nothing, and one spanning classes teaches their boundary;
* classification episodes stay whole (a patch is labelled by its majority class).

A dense episode keeps the classes its windows hold (relabelled 0..N-1 in the same order); a
sparse one holds all of its classes, since its support keeps every labelled pixel.

A tile no larger than the window along a side keeps that side whole, so small tiles (the 32 px
sample data) are used as they are. Everything is drawn from the generator given (an episode's own
`episode_rng`), so a cropped episode is still a pure function of (seed, region, number).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from geo.classes import IGNORE_INDEX
from tasks.episodes import Episode, Sampler


@dataclass(frozen=True)
class Crop:
    """Window sides of cropped episodes (see the module's docstring)."""

    size: int = 96
    """Side of query windows, dense support windows and pretraining windows."""
    support_window: int = 32
    """Side of the windows cut around the labelled pixels of a sparse support (adapt's default)."""
    candidates: int = 4
    """Windows tried per random window; the one holding the most classes wins."""

    def __post_init__(self) -> None:
        if self.size < 1 or self.support_window < 1 or self.candidates < 1:
            raise ValueError(
                f"crop: size ({self.size}), support_window ({self.support_window}) and candidates "
                f"({self.candidates}) must be at least 1"
            )


def crop_episode(episode: Episode, crop: Crop, rng: np.random.Generator) -> Episode:
    """The episode cut into windows; classification episodes are returned as they are."""
    if episode.support_labels.ndim == 1:
        return episode
    if episode.sparse_support:
        support_images, support_labels = label_windows(
            episode.support_images, episode.support_labels, crop.support_window, rng
        )
    else:
        support_images, support_labels = random_windows(
            episode.support_images, episode.support_labels, crop.size, rng, candidates=crop.candidates
        )
    query_images, query_labels = random_windows(
        episode.query_images, episode.query_labels, crop.size, rng, candidates=crop.candidates
    )
    classes = episode.classes
    if not episode.sparse_support:  # a dense episode's classes are those its windows hold
        classes, support_labels, query_labels = _held_classes(classes, support_labels, query_labels)
    return dataclasses.replace(
        episode,
        classes=classes,
        support_images=support_images,
        support_labels=support_labels,
        query_images=query_images,
        query_labels=query_labels,
    )


def _held_classes(
    classes: np.ndarray, support: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The episode's classes that `support` or `query` (labels 0..N-1) still hold, relabelled."""
    held = np.zeros(len(classes), dtype=bool)
    for labels in (support, query):
        held |= np.bincount(labels[labels != IGNORE_INDEX].reshape(-1), minlength=len(classes)).astype(bool)
    if held.all() or not held.any():
        return classes, support, query
    lookup = np.full(IGNORE_INDEX + 1, IGNORE_INDEX, dtype=support.dtype)
    lookup[np.flatnonzero(held)] = np.arange(int(held.sum()))
    return classes[held], lookup[support], lookup[query]


class CroppedSampler:
    """A sampler whose episodes are cut by `crop_episode`, from the same generator right after
    drawing them (shortfalls and regions are the wrapped sampler's)."""

    def __init__(self, sampler: Sampler, crop: Crop) -> None:
        self.sampler, self.crop = sampler, crop

    def regions(self) -> list[str]:
        return self.sampler.regions()

    def shortfall(self, region: str) -> str | None:
        return self.sampler.shortfall(region)

    def sample(self, region: str, rng: np.random.Generator) -> Episode:
        return crop_episode(self.sampler.sample(region, rng), self.crop, rng)


def _sides(labels: np.ndarray, size: int) -> tuple[int, int]:
    """The window's (height, width): `size`, or a tile's whole side where it is no larger."""
    height, width = labels.shape[-2:]
    return min(size, height), min(size, width)


def random_windows(
    images: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, *, candidates: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """One window of `size` px per tile of `images` (B, C, H, W) and `labels` (B, H, W): of
    `candidates` random windows around random labelled pixels of the tile, the first holding
    labelled pixels of the most classes (a tile without labels: anywhere)."""
    rows, cols = _sides(labels, size)
    height, width = labels.shape[-2:]
    if (rows, cols) == (height, width):
        return images, labels
    offsets = np.zeros((len(labels), 2), dtype=np.int64)
    for tile, mask in enumerate(labels):
        labelled = np.flatnonzero(mask != IGNORE_INDEX)
        if not len(labelled):
            offsets[tile] = rng.integers(0, height - rows + 1), rng.integers(0, width - cols + 1)
            continue
        # each candidate holds a labelled pixel drawn at random, anywhere in the window
        at_row, at_col = np.divmod(rng.choice(labelled, size=candidates), width)
        low_row, low_col = np.maximum(at_row - rows + 1, 0), np.maximum(at_col - cols + 1, 0)
        high_row, high_col = np.minimum(at_row, height - rows), np.minimum(at_col, width - cols)
        drawn = np.column_stack([rng.integers(low_row, high_row + 1), rng.integers(low_col, high_col + 1)])
        held = [_classes_held(mask[row : row + rows, col : col + cols]) for row, col in drawn.tolist()]
        offsets[tile] = drawn[int(np.argmax(held))]
    return _cut(images, labels, np.arange(len(labels)), offsets, (rows, cols))


def _classes_held(window: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(window.reshape(-1), minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX]))


def label_windows(
    images: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `size` px around the labelled pixels of `labels` (B, H, W), as adapt cuts its
    support: per tile a grid of `size` cells at a random phase, one window per cell holding
    labels (moved back inside the tile at its edges), holding that cell's labels only."""
    rows, cols = _sides(labels, size)
    height, width = labels.shape[-2:]
    tiles: list[int] = []
    offsets: list[tuple[int, int]] = []
    pixels: list[tuple[np.ndarray, np.ndarray]] = []
    """Per window: its tile, its offset in the tile and the (rows, cols) of its cell's labels."""
    for tile, mask in enumerate(labels):
        # a random phase where the tile is larger than the window; one cell along a side otherwise
        phase_row = int(rng.integers(0, rows)) if height > rows else 0
        phase_col = int(rng.integers(0, cols)) if width > cols else 0
        at_row, at_col = np.nonzero(mask != IGNORE_INDEX)
        cell_row, cell_col = (at_row + phase_row) // rows, (at_col + phase_col) // cols
        for cell in sorted(set(zip(cell_row.tolist(), cell_col.tolist()))):
            inside = (cell_row == cell[0]) & (cell_col == cell[1])
            tiles.append(tile)
            offsets.append(
                (
                    min(max(cell[0] * rows - phase_row, 0), height - rows),
                    min(max(cell[1] * cols - phase_col, 0), width - cols),
                )
            )
            pixels.append((at_row[inside], at_col[inside]))
    out_images, _ = _cut(
        images, labels, np.asarray(tiles, dtype=np.int64), np.asarray(offsets, dtype=np.int64), (rows, cols)
    )
    out_labels = np.full((len(tiles), rows, cols), IGNORE_INDEX, dtype=labels.dtype)
    for window, (tile, (row, col), (at_row, at_col)) in enumerate(zip(tiles, offsets, pixels)):
        out_labels[window, at_row - row, at_col - col] = labels[tile, at_row, at_col]
    return out_images, out_labels


def _cut(
    images: np.ndarray, labels: np.ndarray, tiles: np.ndarray, offsets: np.ndarray, sides: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `sides` at `offsets` (n, 2) of the tiles numbered `tiles` (n,), as new arrays."""
    rows, cols = sides
    out_images = np.empty((len(tiles), images.shape[1], rows, cols), dtype=images.dtype)
    out_labels = np.empty((len(tiles), rows, cols), dtype=labels.dtype)
    for number, (tile, (row, col)) in enumerate(zip(tiles.tolist(), offsets.reshape(-1, 2).tolist())):
        out_images[number] = images[tile, :, row : row + rows, col : col + cols]
        out_labels[number] = labels[tile, row : row + rows, col : col + cols]
    return out_images, out_labels
