"""The `adapt` and `predict` steps: fine-tune a trained model on a few labelled pixels of a new
scene, then map the whole scene into GIS-ready files.

Adaptation is `models.finetune.finetune`, the very function evaluation scores every method with,
on support windows cut around the labels; the loss sees the labelled pixels only. The map covers
only the classes the user labelled, as an episode's prediction covers only its classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geo.classes import IGNORE_INDEX, ClassScheme
from geo.errors import DataError
from geo.export import write_polygons
from geo.labels import LabelledPixels, read_labels
from geo.readers import scale_image
from geo.windows import SceneMap, predict_scene
from models.checkpoint import LoadedRun, RunConfig, load_run, save_run
from models.device import pick_device
from models.finetune import finetune, predict

ADAPTED_CLASSES = "adapted_classes"
"""Key in an adapted run's settings: the global class ids its map is restricted to."""


@dataclass(frozen=True)
class MapConfig:
    """How a scene is mapped; `steps`/`lr` None take the budget picked on validation regions."""

    steps: int | None = None
    lr: float | None = None
    class_column: str = "class"
    support_window: int = 32
    """Side of the support windows cut around labelled pixels (a multiple of the model's stride)."""
    window: int = 256
    overlap: int = 64
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class MapResult:
    scene_map: SceneMap
    classes: tuple[str, ...]
    labelled_pixels: int
    support_windows: int
    polygons: Path | None
    adapted_dir: Path | None


def adapt(
    model_dir: Path,
    image: Path,
    labels: Path,
    out: Path,
    *,
    probabilities: Path | None = None,
    vector: Path | None = None,
    save_adapted: Path | None = None,
    config: MapConfig = MapConfig(),
) -> MapResult:
    """Fine-tune the run in `model_dir` on the labels of `image` and map the scene to `out`."""
    run = _load(model_dir, config.device)
    scheme = _scheme(run.config)
    _check_bands(image, run.config)
    pixels = read_labels(labels, image, scheme, config.class_column)
    if len(pixels) == 0:
        raise DataError(labels, "no labelled pixel falls on the scene")
    classes = np.unique(pixels.class_ids).astype(np.int64)
    support_x, support_y = support_windows(image, pixels, classes, config.support_window)
    steps = config.steps if config.steps is not None else run.config.finetune_steps or 0
    lr = config.lr if config.lr is not None else _budget_rate(run)
    tuned = finetune(run.model, support_x, support_y, classes, steps=steps, lr=lr, seed=config.seed)
    adapted_dir = None
    if save_adapted is not None:
        settings = {**run.config.settings, ADAPTED_CLASSES: classes.tolist(), "adapted_from": str(model_dir)}
        adapted_config = dataclasses.replace(
            run.config, method=f"{run.config.method} adapted", settings=settings, finetune_steps=0
        )
        save_run(save_adapted, tuned, adapted_config)
        adapted_dir = Path(save_adapted)
    result = _map(tuned, image, out, scheme, classes, probabilities, vector, config)
    return dataclasses.replace(
        result, labelled_pixels=len(pixels), support_windows=len(support_x), adapted_dir=adapted_dir
    )


def predict_map(
    model_dir: Path,
    image: Path,
    out: Path,
    *,
    probabilities: Path | None = None,
    vector: Path | None = None,
    config: MapConfig = MapConfig(),
) -> MapResult:
    """Map a scene with a model as it is (an adapted one keeps to the classes it was adapted to)."""
    run = _load(model_dir, config.device)
    _check_bands(image, run.config)
    scheme = _scheme(run.config)
    adapted = run.config.settings.get(ADAPTED_CLASSES)
    classes = np.asarray(adapted if adapted else range(scheme.num_classes), dtype=np.int64)
    return _map(run.model, image, out, scheme, classes, probabilities, vector, config)


def support_windows(
    image: Path, pixels: LabelledPixels, classes: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `size` pixels on a grid over the scene, those holding labels, with their
    labels as 0..N-1 in the order of `classes` and 255 elsewhere. A grid (not one window per
    label) reads every labelled pixel once, however close the labels lie."""
    grid = pixels.grid
    size = min(size, grid.height, grid.width)
    cells = sorted(set(zip((pixels.rows // size).tolist(), (pixels.cols // size).tolist())))
    lookup = np.full(256, IGNORE_INDEX, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    images, labels = [], []
    with rasterio.open(image) as src:
        for cell_row, cell_col in cells:
            row = min(cell_row * size, grid.height - size)
            col = min(cell_col * size, grid.width - size)
            window = Window(col, row, size, size)
            images.append(scale_image(src.read(window=window)))
            labels.append(lookup[pixels.raster(window)])
    return np.stack(images), np.stack(labels)


def _map(
    model, image: Path, out: Path, scheme: ClassScheme, classes: np.ndarray,
    probabilities: Path | None, vector: Path | None, config: MapConfig,
) -> MapResult:
    def predict_batch(batch: np.ndarray) -> np.ndarray:
        scores = np.full((batch.shape[0], scheme.num_classes, *batch.shape[2:]), -np.inf, np.float32)
        chosen = predict(model, batch, classes, batch_size=config.batch_size)
        scores[:, classes] = np.log(np.clip(chosen, 1e-12, None))
        return scores

    scene_map = predict_scene(
        image, predict_batch, out, scheme=scheme, window=config.window, overlap=config.overlap,
        batch_size=config.batch_size, probabilities_path=probabilities,
    )
    polygons = write_polygons(out, vector, scheme) if vector is not None else None
    return MapResult(
        scene_map=scene_map, classes=tuple(scheme.names[c] for c in classes),
        labelled_pixels=0, support_windows=0, polygons=polygons, adapted_dir=None,
    )


def _load(model_dir: Path, device: str) -> LoadedRun:
    if not (Path(model_dir) / "config.json").is_file() or not (Path(model_dir) / "weights.pt").is_file():
        raise DataError(model_dir, "is not a run directory (no config.json and weights.pt)")
    run = load_run(model_dir, pick_device(device))
    if run.config.task != "segmentation":
        raise DataError(model_dir, f"is a {run.config.task} model; mapping a scene needs a segmentation one")
    return run


def _scheme(config: RunConfig) -> ClassScheme:
    return ClassScheme(name=config.method, names=config.class_names, colors=config.class_colors)


def _check_bands(image: Path, config: RunConfig) -> None:
    """The scene must have the bands the model was trained on (in the same order)."""
    try:
        with rasterio.open(image) as src:
            count = src.count
    except rasterio.errors.RasterioError as error:
        raise DataError(image, f"cannot read the scene: {error}") from None
    if count != len(config.bands):
        raise DataError(
            image,
            f"has {count} bands but the model was trained on {len(config.bands)} "
            f"({', '.join(config.bands)})",
        )


def _budget_rate(run: LoadedRun) -> float | dict[str, float]:
    """The run's fine-tuning rate: its scalar budget, or its learned per-tensor rates."""
    if run.config.finetune_lr is not None:
        return run.config.finetune_lr
    if run.inner_lrs:
        return run.inner_lrs
    return run.config.inner_lr or 0.01
