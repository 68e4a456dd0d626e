"""The `adapt` and `predict` steps: adapt to a new scene from a few labelled pixels, check on the
labels themselves how good each way of adapting is, and map the whole scene into GIS-ready files.

Candidates (`pipeline.candidates`): each given run fine-tuned (`models.finetune.finetune`, the
very function evaluation scores every method with, on support windows cut around the labels) and
with a closed-form head on its features, and the per-pixel classifier on the bands. Spatially
blocked cross-validation on the labels (`pipeline.crossval`) scores them all on the same folds;
the best maps the scene (or the first, with pick="first"), and `MAP.report.json` / `.md` say
what each candidate is estimated to score. The map covers only the classes the user labelled.

Every input is checked (models, scene, bands, labels, output paths) before anything is written,
so a user mistake leaves the output folder as it was. Labelled pixels on the scene's nodata are
dropped (and counted): no candidate sees what lies under them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geo.atomic import (
    atomic_output,
    check_output_file,
    check_output_folder,
    folder_lock,
    output_group,
    remove_output,
)
from geo.classes import DFC10, IGNORE_INDEX, SCHEMES, ClassScheme
from geo.errors import DataError
from geo.export import style_path, write_polygons
from geo.labels import LabelledPixels, labels_crs, read_labels
from geo.progress import phase, progress_bar
from geo.readers import finite_pixels, has_data, read_valid, read_window, scene_scaling
from geo.stac import item_path, write_map_item
from geo.suggest import ConfidenceCells, Suggestions, centre_values, pick_suggestions, write_suggestions
from geo.windows import SceneMap, predict_scene
from models.checkpoint import TRAIN_STATE, LoadedRun, RunConfig, load_checkpoint, load_run, save_run
from models.device import pick_device
from models.finetune import predict
from pipeline.candidates import (
    PIXEL,
    Candidate,
    HeadCandidate,
    LinearScores,
    PixelCandidate,
    Predictor,
    Tuned,
    run_candidates,
)
from pipeline.crossval import DEFAULT_FOLDS, DEFAULT_SPACING, LabelledScene, cross_validate
from pipeline.map_report import MapReport, MapReportInput, report_paths, write_map_report

ADAPTED_CLASSES = "adapted_classes"
"""Key in an adapted run's settings: the global class ids its map is restricted to."""
ADAPTED_HEAD = "head.pt"
"""File of an adapted run whose map comes from a closed-form head, not the fine-tuned weights."""


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
    pick: str = "best"
    """"best": map with the candidate of best cross-validated accuracy; "first": the --model's
    first variant (fine-tuned, for a run); or a candidate's name (e.g. "r2d2 head", "pixel")."""
    check: bool = True
    """Cross-validate the candidates on the labels (spatially blocked folds) and write a report."""
    folds: int = DEFAULT_FOLDS
    spacing: float = DEFAULT_SPACING
    pixel: bool = True
    """The classical per-pixel classifier is always a candidate: a map never silently loses to it."""

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.spacing < 0:
            raise ValueError(f"spacing must be >= 0 pixels, got {self.spacing}")


@dataclass(frozen=True)
class SuggestConfig:
    """`count` points where one more label would help most, written to `out` (`geo.suggest`)."""

    count: int
    out: Path
    spacing: float = 32
    """Pixels between suggestions, and between a suggestion and any existing label."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"--suggest must be at least 1, got {self.count}")
        if self.spacing < 0:
            raise ValueError(f"--suggest-spacing must be >= 0 pixels, got {self.spacing}")


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
    chosen: str = ""
    """The candidate that made the map."""
    report: MapReport | None = None
    item: Path | None = None
    """The map's STAC Item (`MAP.stac.json`, geo/stac.py), listing the files written with it."""
    suggestions: Suggestions | None = None
    """Where one more label would help most (`adapt --suggest`), written to `SuggestConfig.out`."""


def adapt(
    model_dir: Path | str,
    image: Path,
    labels: Path,
    out: Path,
    *,
    compare: Sequence[Path | str] = (),
    probabilities: Path | None = None,
    confidence: Path | None = None,
    vector: Path | None = None,
    save_adapted: Path | None = None,
    suggest: SuggestConfig | None = None,
    config: MapConfig = MapConfig(),
    progress: bool = True,
) -> MapResult:
    """Adapt every candidate (`model_dir` and `compare`: run directories or "pixel"; the pixel
    classifier joins them unless `config.pixel` is False) to the labels
    of `image`, cross-validate them on spatially blocked folds of the labels, map the scene with
    the best (or the first) and write the map, its report and the optional outputs; `progress`
    shows the cross-validation and the map's progress (stderr). `suggest` writes the points where
    the map is least confident, spread apart and away from the labels, in the labels' CRS.

    The adapted model is saved (with `save_adapted`) only once the map is written.
    """
    sources = _unique_sources([model_dir, *compare, *([PIXEL] if config.pixel else [])])
    _check_outputs(
        {
            "--out": out,
            "--probabilities": probabilities,
            "--confidence": confidence,
            "--vector": vector,
            "--suggest-out": suggest.out if suggest else None,
        },
        {
            "--model": model_dir,
            "--image": image,
            "--labels": labels,
            **{f"--compare {s}": s for s in sources[1:] if s != PIXEL},
        },
        reports=config.check,
    )
    runs = {source: _load(Path(source), config.device, f", nor `{PIXEL}`") for source in sources if source != PIXEL}
    if save_adapted is not None:
        if not runs:
            raise DataError(
                labels, "--save-adapted needs a run among --model/--compare (the pixel classifier alone is not a run)"
            )
        for source in runs:
            _check_adapted_dir(Path(save_adapted), Path(source))
    scheme = _common_scheme(runs)
    bands = _scene_bands(image, next(iter(runs.values())).config.bands if runs else None)
    stride = max([_stride(run.config) for run in runs.values()], default=1)
    if config.support_window < stride or config.support_window % stride:
        raise ValueError(
            f"support_window ({config.support_window}) must be a multiple of the model's stride ({stride})"
        )
    pixels = read_labels(labels, image, scheme, config.class_column)
    on_data = _on_data(image, pixels, config.support_window, bands)
    if not on_data.any():
        raise DataError(labels, f"all {len(pixels)} labelled pixels fall on nodata pixels of the scene {image}")
    kept = dataclasses.replace(
        pixels, rows=pixels.rows[on_data], cols=pixels.cols[on_data], class_ids=pixels.class_ids[on_data]
    )
    candidates = _candidates(sources, runs, config)
    named = [candidate.name for candidate in candidates]
    if config.pick not in ("best", "first", *named):
        raise DataError(labels, f"--pick {config.pick!r} is not best, first or a candidate: {', '.join(named)}")
    window, _ = _scene_window(image, config, stride)
    scene = labelled_scene(image, kept, config.support_window, window, bands)
    validation = (
        cross_validate(candidates, scene, spacing=config.spacing, folds=config.folds, progress=progress)
        if config.check
        else None
    )
    best = validation.best() if validation is not None else None
    wanted = {"best": best.name if best else named[0], "first": named[0]}.get(config.pick, config.pick)
    chosen = candidates[named.index(wanted)]
    everything = np.ones(len(scene), dtype=bool)
    phase(f"adapt: fitting {chosen.name} on all {len(scene)} labelled pixels", enabled=progress)
    predictor = chosen.fit(scene.support(everything, context=chosen.fits_on_context))
    cells = ConfidenceCells.for_spacing(pixels.grid, suggest.spacing) if suggest else None
    with output_group():  # the map, its style, probabilities, polygons, reports and suggestions appear together
        result = _map(
            predictor,
            image,
            out,
            scheme,
            scene.classes,
            probabilities,
            confidence,
            vector,
            config,
            stride,
            bands,
            confidence_cells=cells,
            progress=progress,
        )
        suggestions = None
        if suggest is not None and cells is not None:
            values = centre_values(image, bands, cells)
            suggestions = pick_suggestions(cells, values, pixels.rows, pixels.cols, suggest.count, suggest.spacing)
            write_suggestions(
                suggest.out,
                suggestions,
                pixels.grid,
                scheme,
                class_column=config.class_column,
                crs=labels_crs(labels),
            )
        report = None
        if validation is not None:
            report = write_map_report(
                out,
                MapReportInput(
                    scene=image,
                    labels=labels,
                    class_names=scheme.names,
                    classes=scene.classes,
                    targets=scene.targets,
                    validation=validation,
                    chosen=chosen.name,
                    pick=config.pick,
                    descriptions={c.name: c.describe() for c in candidates},
                ),
            )
        estimate = report.chosen_estimate if report is not None else None
        item = _write_item(
            result,
            out,
            image,
            scheme,
            report,
            suggest.out if suggest is not None else None,
            {
                "method": chosen.name,
                "model": getattr(chosen, "source", None),
                "labels": str(labels),
                **(
                    {"estimated_accuracy": estimate["accuracy"], "estimated_accuracy_ci95": estimate["ci95"]}
                    if estimate is not None
                    else {}
                ),
            },
        )
    adapted_dir = None
    if save_adapted is not None:
        adapted_dir = _save_adapted(Path(save_adapted), chosen, predictor, runs, scene, model_dir)
    return dataclasses.replace(
        result,
        labelled_pixels=len(kept),
        support_windows=len(scene.support_images),
        adapted_dir=adapted_dir,
        nodata_labels=int((~on_data).sum()),
        conflicting_labels=pixels.conflicting,
        chosen=chosen.name,
        report=report,
        item=item,
        suggestions=suggestions,
    )


def _unique_sources(given: Sequence[Path | str]) -> list[str]:
    """Candidate sources as strings, the --model first, each once."""
    sources: list[str] = []
    for source in given:
        text = str(source)
        if text not in sources:
            sources.append(text)
    return sources


def _candidates(sources: Sequence[str], runs: dict[str, LoadedRun], config: MapConfig) -> list[Candidate]:
    """Each run's fine-tuned and closed-form variants (named by the run's folder), and the pixel
    classifier, in the order given."""
    names = _run_names(list(runs))
    candidates: list[Candidate] = []
    for source in sources:
        if source == PIXEL:
            candidates.append(PixelCandidate())
            continue
        run = runs[source]
        if config.steps is not None or config.lr is not None:
            steps = config.steps if config.steps is not None else run.config.finetune_steps
            lr = config.lr if config.lr is not None else run.config.finetune_lr
            run = dataclasses.replace(run, config=dataclasses.replace(run.config, finetune_steps=steps, finetune_lr=lr))
        if run.config.finetune_steps is None:
            raise DataError(Path(source), "has no fine-tuning budget (its training did not finish): give --steps")
        candidates += run_candidates(run, names[source], source=source, seed=config.seed)
    return candidates


def _run_names(sources: Sequence[str]) -> dict[str, str]:
    """Short names for runs in reports: the folder's name, or its path where two names clash."""
    names = {source: Path(source).name or source for source in sources}
    clash = {name for name in names.values() if list(names.values()).count(name) > 1}
    return {source: source if name in clash else name for source, name in names.items()}


def _common_scheme(runs: dict[str, LoadedRun]) -> ClassScheme:
    """The class scheme every run shares (DFC-10 when only the pixel classifier is asked for)."""
    if not runs:
        return DFC10
    (first, first_run), *others = runs.items()
    for source, run in others:
        if run.config.class_names != first_run.config.class_names or run.config.bands != first_run.config.bands:
            raise DataError(
                Path(source), f"has other classes or bands than {first}: compare runs of one class scheme and bands"
            )
    return _scheme(first_run.config)


def labelled_scene(
    image: Path, pixels: LabelledPixels, support_size: int, context_size: int, bands: Sequence[int] | None = None
) -> LabelledScene:
    """The labelled pixels with their support windows and prediction-size context windows."""
    classes = np.unique(pixels.class_ids).astype(np.int64)
    support_images, support_at = cut_windows(image, pixels, support_size, bands)
    context_images, context_at = cut_windows(image, pixels, context_size, bands)
    return LabelledScene(
        classes=classes,
        targets=np.searchsorted(classes, pixels.class_ids),
        rows=pixels.rows,
        cols=pixels.cols,
        support_images=support_images,
        support_at=support_at,
        context_images=context_images,
        context_at=context_at,
    )


def support_windows(
    image: Path, pixels: LabelledPixels, classes: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `size` pixels on a grid over the scene, those holding labels, with their
    labels as 0..N-1 in the order of `classes` and 255 elsewhere (see `cut_windows`)."""
    images, at = cut_windows(image, pixels, size)
    labels = np.full((len(images), size, size), IGNORE_INDEX, dtype=np.int64)
    labels[at[:, 0], at[:, 1], at[:, 2]] = np.searchsorted(classes, pixels.class_ids)
    return images, labels


def cut_windows(
    image: Path, pixels: LabelledPixels, size: int, bands: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scaled windows of `size` pixels on a grid over the scene, those holding labels, and where
    each label lies in them ((n, 3): window, row, column). A grid (not one window per label)
    reads every labelled pixel once, however close the labels lie: a cell's window is moved back
    to end at the scene's edge, and a label belongs to its own cell's window only. A scene
    smaller than `size` gives windows of `size` padded with zeros. `bands`: the 1-based bands
    to read, in the model's order (default: all); non-finite pixels are zeroed, as prediction
    does (`geo.readers.finite_pixels`)."""
    images = []
    at = np.zeros((len(pixels), 3), dtype=np.int64)
    cell_rows, cell_cols = pixels.rows // size, pixels.cols // size
    with rasterio.open(image) as src:
        indexes = list(src.indexes) if bands is None else list(bands)
        scaling = scene_scaling(src, indexes)
        for number, (window, (cell_row, cell_col)) in enumerate(_cell_windows(pixels, size)):
            raw = read_window(src, image, window, indexes, boundless=True)
            finite_pixels(raw)
            images.append(scaling(raw))
            inside = (cell_rows == cell_row) & (cell_cols == cell_col)
            at[inside] = np.column_stack(
                [
                    np.full(int(inside.sum()), number),
                    pixels.rows[inside] - int(window.row_off),
                    pixels.cols[inside] - int(window.col_off),
                ]
            )
    return np.stack(images), at


def _cell_windows(pixels: LabelledPixels, size: int) -> list[tuple[Window, tuple[int, int]]]:
    """Per grid cell holding labels: its `size` window inside the scene (where it fits), and the
    cell's (row, column) on the grid."""
    grid = pixels.grid
    cells = sorted(set(zip((pixels.rows // size).tolist(), (pixels.cols // size).tolist())))
    windows = []
    for cell_row, cell_col in cells:
        row = max(0, min(cell_row * size, grid.height - size))
        col = max(0, min(cell_col * size, grid.width - size))
        windows.append((Window(col, row, size, size), (cell_row, cell_col)))
    return windows


def predict_map(
    model_dir: Path,
    image: Path,
    out: Path,
    *,
    probabilities: Path | None = None,
    confidence: Path | None = None,
    vector: Path | None = None,
    config: MapConfig = MapConfig(),
    progress: bool = True,
) -> MapResult:
    """Map a scene with a model as it is: an adapted one keeps to the classes it was adapted to,
    and maps with its closed-form head when adapting chose one; `progress` shows the map's
    progress (stderr)."""
    _check_outputs(
        {"--out": out, "--probabilities": probabilities, "--confidence": confidence, "--vector": vector},
        {"--model": model_dir, "--image": image},
        reports=False,
    )
    run = _load(model_dir, config.device)
    bands = _scene_bands(image, run.config.bands)
    scheme = _scheme(run.config)
    adapted = run.config.settings.get(ADAPTED_CLASSES)
    classes = np.asarray(adapted if adapted else range(scheme.num_classes), dtype=np.int64)
    predictor: Predictor | None = _saved_head(Path(model_dir), run, len(classes))
    if predictor is None:
        model = run.model
        predictor = lambda batch: predict(model, batch, classes, batch_size=config.batch_size)  # noqa: E731
    with output_group():  # the map's files and its STAC item appear together
        result = _map(
            predictor,
            image,
            out,
            scheme,
            classes,
            probabilities,
            confidence,
            vector,
            config,
            _stride(run.config),
            bands,
            progress=progress,
        )
        item = _write_item(
            result,
            out,
            image,
            scheme,
            None,
            None,
            {
                "method": run.config.settings.get("adapted_candidate", run.config.method),
                "model": str(model_dir),
            },
        )
    return dataclasses.replace(result, item=item)


def _write_item(
    result: MapResult,
    out: Path,
    image: Path,
    scheme: ClassScheme,
    report: MapReport | None,
    suggestions: Path | None,
    provenance: dict[str, object],
) -> Path:
    """The map's STAC Item, listing exactly the files this run writes with the map (so a map
    rewritten without, say, probabilities has an item without them)."""
    assets = {
        "style": result.scene_map.style,
        "probabilities": result.scene_map.probabilities,
        "confidence": result.scene_map.confidence,
        "confidence-style": None if result.scene_map.confidence is None else style_path(result.scene_map.confidence),
        "polygons": result.polygons,
        "report": report.json if report is not None else None,
        "report-markdown": report.markdown if report is not None else None,
        "suggestions": suggestions,
    }
    return write_map_item(
        out,
        scheme,
        scene=image,
        assets=assets,
        provenance={"scheme": scheme.name, "scene": str(image), **provenance},
    )


def _on_data(image: Path, pixels: LabelledPixels, size: int, bands: Sequence[int]) -> np.ndarray:
    """Whether each labelled pixel has data in the scene (its dataset mask, and every band read
    finite: NaN and +-inf are nodata), read cell by cell."""
    on_data = np.zeros(len(pixels), dtype=bool)
    with rasterio.open(image) as src:
        for window, _ in _cell_windows(pixels, size):
            window = window.intersection(Window(0, 0, src.width, src.height))
            row, col = int(window.row_off), int(window.col_off)
            inside = (
                (pixels.rows >= row)
                & (pixels.rows < row + int(window.height))
                & (pixels.cols >= col)
                & (pixels.cols < col + int(window.width))
            )
            _, valid = read_valid(src, window, bands)
            on_data[inside] = valid[pixels.rows[inside] - row, pixels.cols[inside] - col]
    return on_data


def _map(
    predictor: Predictor,
    image: Path,
    out: Path,
    scheme: ClassScheme,
    classes: np.ndarray,
    probabilities: Path | None,
    confidence: Path | None,
    vector: Path | None,
    config: MapConfig,
    stride: int,
    bands: Sequence[int],
    *,
    confidence_cells: ConfidenceCells | None = None,
    progress: bool,
) -> MapResult:
    window, overlap = _scene_window(image, config, stride)
    with rasterio.open(image) as src:
        rows = src.height

    every_class = np.array_equal(classes, np.arange(scheme.num_classes))

    def predict_batch(batch: np.ndarray) -> np.ndarray:  # the scheme's classes, 0 for those not adapted to
        probabilities = predictor(batch)
        if every_class:
            return probabilities
        on_scheme = np.zeros((batch.shape[0], scheme.num_classes, *batch.shape[2:]), np.float32)
        on_scheme[:, classes] = probabilities
        return on_scheme

    try:
        with output_group():  # all of the map's files appear together (or none): geo/atomic.py
            for stale in report_paths(out).values():  # an earlier map's report; adapt writes its own
                remove_output(stale)
            with progress_bar(rows, "map", unit="rows", enabled=progress) as bar:

                def mapped(done: int, _rows: int) -> None:
                    bar.update(done - bar.n)

                scene_map = predict_scene(
                    image,
                    predict_batch,
                    out,
                    scheme=scheme,
                    window=window,
                    overlap=overlap,
                    batch_size=config.batch_size,
                    bands=bands,
                    probabilities_path=probabilities,
                    confidence_path=confidence,
                    confidence_cells=confidence_cells,
                    progress=mapped,
                )
            if vector is not None:
                phase(f"map: writing polygons to {vector}", enabled=progress)
            polygons = write_polygons(out, vector, scheme) if vector is not None else None
    except (OSError, rasterio.errors.RasterioError) as error:  # an output folder we cannot write to
        raise DataError(out, f"cannot write the outputs: {error}") from None
    return MapResult(
        scene_map=scene_map,
        classes=tuple(scheme.names[c] for c in classes),
        labelled_pixels=0,
        support_windows=0,
        polygons=polygons,
        adapted_dir=None,
    )


def _save_adapted(
    folder: Path,
    chosen: Candidate,
    predictor: Predictor,
    runs: dict[str, LoadedRun],
    scene: LabelledScene,
    model_dir: Path | str,
) -> Path:
    """The chosen candidate as a run `predict` maps with: the fine-tuned weights, or the run's
    network with the fitted head beside it (`head.pt`; for the pixel classifier, on the bands)."""
    source = getattr(chosen, "source", None) or next(iter(runs))
    run = runs[source]
    model = predictor.model if isinstance(predictor, Tuned) else run.model
    settings = {
        **run.config.settings,
        ADAPTED_CLASSES: scene.classes.tolist(),
        "adapted_from": str(model_dir),
        "adapted_candidate": chosen.name,
    }
    adapted_config = dataclasses.replace(run.config, method=f"{run.config.method} adapted", settings=settings)
    with folder_lock(folder):  # two adapts saving here at once: one's files, never a mix
        save_run(folder, model, adapted_config, run.inner_lrs)
        head = folder / ADAPTED_HEAD
        if isinstance(predictor, LinearScores):
            features = "bands" if isinstance(chosen, PixelCandidate) else "network"
            with atomic_output(head) as tmp:
                torch.save({"features": features, **predictor.state()}, tmp)
        else:
            head.unlink(missing_ok=True)
    return folder


def _saved_head(run_dir: Path, run: LoadedRun, count: int) -> LinearScores | None:
    """The closed-form head an adapted run maps with, None when it maps with its weights."""
    path = run_dir / ADAPTED_HEAD
    if not path.exists():
        return None
    state = load_checkpoint(path)
    features = state.pop("features", None)
    if features not in ("bands", "network"):
        raise DataError(path, "not a landcover head (no features entry of bands or network)")
    featurize = (lambda images: images) if features == "bands" else HeadCandidate("", run.model).featurize
    return LinearScores.from_state(state, count, featurize)


def _scene_window(image: Path, config: MapConfig, stride: int) -> tuple[int, int]:
    """The prediction window and overlap: `config`'s, cut to a scene smaller than the window so
    that windows hold scene pixels, not zero padding; always a multiple of the model's stride."""
    with rasterio.open(image) as src:
        side = min(src.height, src.width)
    window = max(stride, min(config.window, side) // stride * stride)
    return window, min(config.overlap, window // 4) if window < config.window else config.overlap


def _stride(config: RunConfig) -> int:
    """Input sides must be multiples of this (a U-Net halves its input encoder_depth times)."""
    return 2**config.arch.encoder_depth if config.arch.name == "unet" else 1


def _check_outputs(outputs: dict[str, Path | None], inputs: dict[str, Path | str], *, reports: bool) -> None:
    """Outputs (and the QGIS style and reports beside the map) must be distinct and overwrite no input."""
    out = outputs["--out"]
    assert out is not None
    named = {option: Path(path).resolve() for option, path in outputs.items() if path is not None}
    named["the map's style"] = style_path(out).resolve()
    named["the map's STAC item"] = item_path(out).resolve()
    if reports:
        named.update({f"the map's {kind} report": path.resolve() for kind, path in report_paths(out).items()})
    given = {option: Path(path).resolve() for option, path in inputs.items()}
    seen: dict[Path, str] = {}
    for option, path in named.items():
        if path in seen:
            raise DataError(path, f"is the target of both {seen[path]} and {option}: give different files")
        for input_option, input_path in given.items():
            if path == input_path:
                raise DataError(path, f"is the {input_option} input; {option} would overwrite it")
        check_output_file(path, option)
        seen[path] = option


def _check_adapted_dir(save_adapted: Path, model_dir: Path) -> None:
    """Never overwrite the run being adapted, nor a run still in training."""
    if save_adapted.resolve() == Path(model_dir).resolve():
        raise DataError(save_adapted, "is the --model run itself; save the adapted model elsewhere")
    check_output_folder(save_adapted, "--save-adapted")
    if (save_adapted / TRAIN_STATE).exists():
        raise DataError(save_adapted, "holds a training run (train_state.pt); save the adapted model elsewhere")


def _load(model_dir: Path, device: str, otherwise: str = "") -> LoadedRun:
    """A run directory's model; `otherwise` names what else the option would have accepted."""
    if not (Path(model_dir) / "config.json").is_file() or not (Path(model_dir) / "weights.pt").is_file():
        raise DataError(model_dir, f"is not a run directory (no config.json and weights.pt){otherwise}")
    run = load_run(model_dir, pick_device(device))
    if run.config.task != "segmentation":
        raise DataError(model_dir, f"is a {run.config.task} model; mapping a scene needs a segmentation one")
    return run


def _scheme(config: RunConfig) -> ClassScheme:
    """The run's class scheme, named as the dataset's (e.g. "dfc10"): the maps' CLASS_SCHEME tag."""
    for scheme in SCHEMES.values():
        if scheme.names == config.class_names:
            return ClassScheme(name=scheme.name, names=config.class_names, colors=config.class_colors)
    return ClassScheme(name="folder", names=config.class_names, colors=config.class_colors)


def _scene_bands(image: Path, bands: Sequence[str] | None) -> list[int]:
    """The 1-based scene bands holding the model's `bands`, in the model's order (None: every band,
    for the pixel classifier alone). A scene that names all its bands has them matched by name, so
    one with the bands in another order maps right; else it must have as many bands as the model.
    A scene without a pixel of data is refused here, before any work."""
    try:
        with rasterio.open(image) as src:
            indexes = list(src.indexes) if bands is None else _match_bands(image, src.descriptions, bands)
            if not has_data(src, indexes):
                raise DataError(image, "holds no data: every pixel is nodata, NaN or +-inf")
    except rasterio.errors.RasterioError as error:
        raise DataError(image, f"cannot read the scene: {error}") from None
    return indexes


def _match_bands(image: Path, descriptions: Sequence[str | None], bands: Sequence[str]) -> list[int]:
    """Indexes of the bands described as `bands` (see `_band_key`), or by position when the scene
    does not name its bands as the model does (no descriptions, or generic ones like "Band 1")."""
    keys = [_band_key(str(name)) for name in descriptions if name]
    if not all(descriptions) or not set(keys) & {_band_key(band) for band in bands}:
        if len(descriptions) != len(bands):
            raise DataError(
                image, f"has {len(descriptions)} bands but the model was trained on {len(bands)} ({', '.join(bands)})"
            )
        return list(range(1, len(bands) + 1))
    missing = [band for band in bands if _band_key(band) not in keys]
    twice = [band for band in bands if keys.count(_band_key(band)) > 1]
    if missing or twice:
        problem = f"no band {', '.join(missing)}" if missing else f"more than one band {', '.join(twice)}"
        raise DataError(
            image,
            f"has bands {', '.join(map(str, descriptions))} ({problem}); the model needs "
            f"{', '.join(bands)}, in that order",
        )
    return [keys.index(_band_key(band)) + 1 for band in bands]


def _band_key(name: str) -> str:
    """A band name as matched: any case, Sentinel-2 zero padding dropped ("B02" is "b2", "B08A" "b8a")."""
    return re.sub(r"^b0+(?=\d)", "b", name.strip().lower())
