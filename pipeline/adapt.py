"""The `adapt` and `predict` steps: fine-tune a trained model on a few labelled pixels of a new
scene, then map the whole scene into GIS-ready files.

Adaptation is `models.finetune.finetune`, the very function evaluation scores every method with,
on support windows cut around the labels; the loss sees the labelled pixels only. The map covers
only the classes the user labelled, as an episode's prediction covers only its classes.

Every input is checked (model, scene, bands, labels, output paths) before anything is written, so
a user mistake leaves the output folder as it was. Labelled pixels on the scene's nodata are
dropped (and counted): the model never sees what lies under them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from geo.classes import IGNORE_INDEX, SCHEMES, ClassScheme
from geo.errors import DataError
from geo.export import style_path, write_polygons
from geo.labels import LabelledPixels, read_labels
from geo.readers import scale_image
from geo.windows import SceneMap, predict_scene
from models.checkpoint import TRAIN_STATE, LoadedRun, RunConfig, load_run, save_run
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
    """Prediction window; cut to the scene (a multiple of the model's stride) when the scene is
    smaller, since zero padding would enter the per-window GroupNorm statistics and skew them."""
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
    nodata_labels: int = 0
    """Labelled pixels dropped because the scene holds no data there."""
    conflicting_labels: int = 0
    """Pixels labelled with two different classes, dropped (see `geo.labels.LabelledPixels`)."""


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
    """Fine-tune the run in `model_dir` on the labels of `image` and map the scene to `out`.

    The adapted model is saved (with `save_adapted`) only once the map is written.
    """
    _check_outputs(
        {"--out": out, "--probabilities": probabilities, "--vector": vector},
        {"--model": model_dir, "--image": image, "--labels": labels},
    )
    if save_adapted is not None:
        _check_adapted_dir(Path(save_adapted), Path(model_dir))
    run = _load(model_dir, config.device)
    scheme = _scheme(run.config)
    _check_bands(image, run.config)
    steps = config.steps if config.steps is not None else run.config.finetune_steps
    if steps is None:
        raise DataError(model_dir, "has no fine-tuning budget (its training did not finish): give --steps")
    stride = _stride(run.config)
    if config.support_window < stride or config.support_window % stride:
        raise ValueError(f"support_window ({config.support_window}) must be a multiple of the model's stride ({stride})")
    pixels = read_labels(labels, image, scheme, config.class_column)
    on_data = _on_data(image, pixels, config.support_window)
    if not on_data.any():
        raise DataError(labels, f"all {len(pixels)} labelled pixels fall on nodata pixels of the scene {image}")
    kept = dataclasses.replace(
        pixels, rows=pixels.rows[on_data], cols=pixels.cols[on_data], class_ids=pixels.class_ids[on_data]
    )
    classes = np.unique(kept.class_ids).astype(np.int64)
    support_x, support_y = support_windows(image, kept, classes, config.support_window)
    lr = config.lr if config.lr is not None else _budget_rate(run)
    tuned = finetune(run.model, support_x, support_y, classes, steps=steps, lr=lr, seed=config.seed)
    result = _map(tuned, run.config, image, out, scheme, classes, probabilities, vector, config)
    adapted_dir = None
    if save_adapted is not None:
        settings = {**run.config.settings, ADAPTED_CLASSES: classes.tolist(), "adapted_from": str(model_dir)}
        adapted_config = dataclasses.replace(run.config, method=f"{run.config.method} adapted", settings=settings)
        save_run(save_adapted, tuned, adapted_config, run.inner_lrs)
        adapted_dir = Path(save_adapted)
    return dataclasses.replace(
        result, labelled_pixels=len(kept), support_windows=len(support_x), adapted_dir=adapted_dir,
        nodata_labels=int((~on_data).sum()), conflicting_labels=pixels.conflicting,
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
    _check_outputs(
        {"--out": out, "--probabilities": probabilities, "--vector": vector},
        {"--model": model_dir, "--image": image},
    )
    run = _load(model_dir, config.device)
    _check_bands(image, run.config)
    scheme = _scheme(run.config)
    adapted = run.config.settings.get(ADAPTED_CLASSES)
    classes = np.asarray(adapted if adapted else range(scheme.num_classes), dtype=np.int64)
    return _map(run.model, run.config, image, out, scheme, classes, probabilities, vector, config)


def support_windows(
    image: Path, pixels: LabelledPixels, classes: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `size` pixels on a grid over the scene, those holding labels, with their
    labels as 0..N-1 in the order of `classes` and 255 elsewhere. A grid (not one window per
    label) reads every labelled pixel once, however close the labels lie: a cell's window is
    moved back to end at the scene's edge, and only its own cell's labels count in it. A scene
    smaller than `size` gives windows of `size` padded with zeros (unlabelled)."""
    lookup = np.full(256, IGNORE_INDEX, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    images, labels = [], []
    with rasterio.open(image) as src:
        for window, (skip_rows, skip_cols) in _cell_windows(pixels, size):
            images.append(scale_image(src.read(window=window, boundless=True, fill_value=0)))
            cell_labels = lookup[pixels.raster(window)]
            cell_labels[:skip_rows] = IGNORE_INDEX
            cell_labels[:, :skip_cols] = IGNORE_INDEX
            labels.append(cell_labels)
    return np.stack(images), np.stack(labels)


def _cell_windows(pixels: LabelledPixels, size: int) -> list[tuple[Window, tuple[int, int]]]:
    """Per grid cell holding labels: its `size` window inside the scene (where it fits), and the
    rows/columns at the window's top/left that belong to the previous cell."""
    grid = pixels.grid
    cells = sorted(set(zip((pixels.rows // size).tolist(), (pixels.cols // size).tolist())))
    windows = []
    for cell_row, cell_col in cells:
        row = max(0, min(cell_row * size, grid.height - size))
        col = max(0, min(cell_col * size, grid.width - size))
        windows.append((Window(col, row, size, size), (cell_row * size - row, cell_col * size - col)))
    return windows


def _on_data(image: Path, pixels: LabelledPixels, size: int) -> np.ndarray:
    """Whether each labelled pixel has data in the scene (its dataset mask), read cell by cell."""
    on_data = np.zeros(len(pixels), dtype=bool)
    with rasterio.open(image) as src:
        for window, _ in _cell_windows(pixels, size):
            window = window.intersection(Window(0, 0, src.width, src.height))
            row, col = int(window.row_off), int(window.col_off)
            inside = (
                (pixels.rows >= row) & (pixels.rows < row + int(window.height))
                & (pixels.cols >= col) & (pixels.cols < col + int(window.width))
            )
            mask = src.dataset_mask(window=window) > 0
            on_data[inside] = mask[pixels.rows[inside] - row, pixels.cols[inside] - col]
    return on_data


def _map(
    model, run_config: RunConfig, image: Path, out: Path, scheme: ClassScheme, classes: np.ndarray,
    probabilities: Path | None, vector: Path | None, config: MapConfig,
) -> MapResult:
    window, overlap = _scene_window(image, config, _stride(run_config))

    def predict_batch(batch: np.ndarray) -> np.ndarray:
        scores = np.full((batch.shape[0], scheme.num_classes, *batch.shape[2:]), -np.inf, np.float32)
        chosen = predict(model, batch, classes, batch_size=config.batch_size)
        scores[:, classes] = np.log(np.clip(chosen, 1e-12, None))
        return scores

    try:
        scene_map = predict_scene(
            image, predict_batch, out, scheme=scheme, window=window, overlap=overlap,
            batch_size=config.batch_size, probabilities_path=probabilities,
        )
        polygons = write_polygons(out, vector, scheme) if vector is not None else None
    except (OSError, rasterio.errors.RasterioError) as error:  # an output folder we cannot write to
        raise DataError(out, f"cannot write the outputs: {error}") from None
    return MapResult(
        scene_map=scene_map, classes=tuple(scheme.names[c] for c in classes),
        labelled_pixels=0, support_windows=0, polygons=polygons, adapted_dir=None,
    )


def _scene_window(image: Path, config: MapConfig, stride: int) -> tuple[int, int]:
    """The prediction window and overlap: `config`'s, cut to a scene smaller than the window so
    that windows hold scene pixels, not zero padding; always a multiple of the model's stride."""
    with rasterio.open(image) as src:
        side = min(src.height, src.width)
    window = max(stride, min(config.window, side) // stride * stride)
    return window, min(config.overlap, window // 4) if window < config.window else config.overlap


def _stride(config: RunConfig) -> int:
    """Input sides must be multiples of this (a U-Net halves its input encoder_depth times)."""
    return 2 ** config.arch.encoder_depth if config.arch.name == "unet" else 1


def _check_outputs(outputs: dict[str, Path | None], inputs: dict[str, Path]) -> None:
    """Outputs (and the QGIS style beside the map) must be distinct and overwrite no input."""
    out = outputs["--out"]
    named = {option: Path(path).resolve() for option, path in outputs.items() if path is not None}
    named["the map's style"] = style_path(out).resolve()
    given = {option: Path(path).resolve() for option, path in inputs.items()}
    seen: dict[Path, str] = {}
    for option, path in named.items():
        if path in seen:
            raise DataError(path, f"is the target of both {seen[path]} and {option}: give different files")
        for input_option, input_path in given.items():
            if path == input_path:
                raise DataError(path, f"is the {input_option} input; {option} would overwrite it")
        if path.is_dir():
            raise DataError(path, f"is a folder; {option} needs a file name")
        seen[path] = option


def _check_adapted_dir(save_adapted: Path, model_dir: Path) -> None:
    """Never overwrite the run being adapted, nor a run still in training."""
    if save_adapted.resolve() == Path(model_dir).resolve():
        raise DataError(save_adapted, "is the --model run itself; save the adapted model elsewhere")
    if save_adapted.exists() and not save_adapted.is_dir():
        raise DataError(save_adapted, "is a file; --save-adapted needs a folder")
    if (save_adapted / TRAIN_STATE).exists():
        raise DataError(save_adapted, "holds a training run (train_state.pt); save the adapted model elsewhere")


def _load(model_dir: Path, device: str) -> LoadedRun:
    if not (Path(model_dir) / "config.json").is_file() or not (Path(model_dir) / "weights.pt").is_file():
        raise DataError(model_dir, "is not a run directory (no config.json and weights.pt)")
    torch_device = pick_device(device)
    try:
        run = load_run(model_dir, torch_device)
    except Exception as error:  # torch, json and the config classes raise many unrelated types
        raise DataError(model_dir, f"cannot load the model: {type(error).__name__}: {error}") from None
    if run.config.task != "segmentation":
        raise DataError(model_dir, f"is a {run.config.task} model; mapping a scene needs a segmentation one")
    return run


def _scheme(config: RunConfig) -> ClassScheme:
    """The run's class scheme, named as the dataset's (e.g. "dfc10"): the maps' CLASS_SCHEME tag."""
    for scheme in SCHEMES.values():
        if scheme.names == config.class_names:
            return ClassScheme(name=scheme.name, names=config.class_names, colors=config.class_colors)
    return ClassScheme(name="folder", names=config.class_names, colors=config.class_colors)


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
