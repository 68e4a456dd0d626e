"""The `landcover` command line: one thin command per pipeline step.

Every command calls the same function in `pipeline/` that the Prefect flows call. User mistakes
(`geo.errors.DataError`) print one line naming the file and exit with status 1.
"""

from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer

from geo.errors import DataError
from geo.sources import SOURCE_NAMES
from models.learner_names import LEARNER_NAMES

app = typer.Typer(
    help="Few-shot land-cover mapping: ingest, build regions, meta-train, evaluate, adapt, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Params = ParamSpec("Params")
Result = TypeVar("Result")


def user_error_line(error: Exception) -> str | None:
    """The one line a user mistake or an unusable file is reported with, None for a bug.

    Step functions raise DataError naming the file; an OSError that escapes them (a read-only or
    full folder, a file where a folder should be) names its file itself.
    """
    if isinstance(error, DataError):
        text = str(error)
    elif isinstance(error, OSError) and error.strerror:
        where = error.filename2 or error.filename
        text = f"{where}: {error.strerror}" if where else error.strerror
    else:
        return None
    # the causes we quote (YAML, GDAL, pyarrow) may span lines; the report stays one line
    return "error: " + " ".join(line.strip() for line in text.splitlines() if line.strip())


def reports_user_errors(command: Callable[Params, Result]) -> Callable[Params, Result]:
    """Turn a user's mistake into a one-line message on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        try:
            return command(*args, **kwargs)
        except (DataError, OSError) as error:
            line = user_error_line(error)
            if line is None:
                raise
            typer.echo(line, err=True)
            raise typer.Exit(code=1) from None

    return wrapper


# --- choices: typer lists them in --help and refuses any other value with the list ---------------
# Each names what the pipeline takes, written out so that importing the CLI imports none of it;
# tests/test_cli_choices.py checks they agree. Commands pass `.value` (a string) on.


class SampleKind(str, enum.Enum):
    """`geo.sample_data.KINDS`."""

    SEN12MS = "sen12ms"
    DEEPGLOBE = "deepglobe"
    EUROSAT = "eurosat"
    SCENE = "scene"


class Difficulty(str, enum.Enum):
    """`geo.sample_data.DIFFICULTIES`."""

    DEFAULT = "default"
    HARD = "hard"


class RegionMethod(str, enum.Enum):
    """`pipeline.regions.RegionMethod`."""

    METADATA = "metadata"
    KMEANS = "kmeans"


# ignore[misc]: mypy types a functional Enum only from literal names, and these come from a tuple
Method = enum.Enum("Method", {name: name for name in LEARNER_NAMES}, type=str)  # type: ignore[misc]
"""The learners of `models.learners.LEARNERS`."""


class Task(str, enum.Enum):
    """`pipeline.protocol.Task`."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


class Size(str, enum.Enum):
    """`pipeline.train.TrainConfig.size`."""

    TINY = "tiny"
    BASE = "base"


class Device(str, enum.Enum):
    """What `models.device.pick_device` takes (a GPU other than the first: CUDA_VISIBLE_DEVICES)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Protocol(str, enum.Enum):
    """`pipeline.protocol.Protocol`."""

    SCENE = "scene"
    EPISODE = "episode"


# --- commands (each a thin wrapper over a pipeline function) ---------------------------------


# `run` and `serve` start Prefect flows: `flows` (and prefect) is imported inside them only.
# ignore[misc]: as Method's, the names come from the source registry
SourceName = enum.Enum("SourceName", {name: name for name in SOURCE_NAMES}, type=str)  # type: ignore[misc]
"""The registered dataset layouts, as `--source` choices (listing them imports no reader)."""

RootOption = typer.Option(
    None, "--root", help="The dataset's folder, when it is no longer where the index was built (moved, shared)."
)
ConfigOption = typer.Option(
    None, "--config", help="Flow YAML (see pipeline/config.py); default: all steps on sample data."
)
DaskAddressOption = typer.Option(
    None, "--dask-address", help="Dask scheduler (tcp://host:port) for ingest and prediction."
)
WorkersOption = typer.Option(
    None, "--workers", min=1, help="Ingest and predict on a local Dask cluster of N processes."
)


@app.command()
@reports_user_errors
def run(
    config: Path | None = ConfigOption,
    dask_address: str | None = DaskAddressOption,
    workers: int | None = WorkersOption,
    refresh: bool = typer.Option(False, "--refresh", help="Recompute all steps, ignore the cache."),
) -> None:
    """Run the end-to-end flow once now; steps whose inputs did not change come from the cache."""
    from flows.flows import run_once

    if dask_address is not None and workers is not None:
        raise typer.BadParameter("give --dask-address or --workers, not both")
    outputs = run_once(config, dask_address=dask_address, workers=workers, refresh=refresh)
    typer.echo(f"index: {outputs.regions}")
    for name, run_dir in outputs.runs.items():
        typer.echo(f"model {name}: {run_dir}")
    if outputs.report is not None:
        typer.echo(f"report: {outputs.report}")
    for path in outputs.maps:
        typer.echo(f"map: {path}")


@app.command()
@reports_user_errors
def serve(
    cron: str = typer.Option(..., "--cron", help="When to run, e.g. '0 3 * * *' (03:00 daily)."),
    config: Path | None = ConfigOption,
    name: str = typer.Option("landcover-scheduled", "--name", help="Deployment name."),
    dask_address: str | None = DaskAddressOption,
    workers: int | None = WorkersOption,
) -> None:
    """Serve the end-to-end flow on a schedule against the Prefect server at PREFECT_API_URL."""
    from flows.flows import ServeError
    from flows.flows import serve as serve_flow

    if dask_address is not None and workers is not None:
        raise typer.BadParameter("give --dask-address or --workers, not both")
    try:
        serve_flow(cron, name=name, config=config, dask_address=dask_address, workers=workers)
    except ServeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None


@app.command("sample-data")
@reports_user_errors
def sample_data(
    out: Path = typer.Argument(..., help="Folder to write into (created when missing)."),
    kind: SampleKind = typer.Option(SampleKind.SEN12MS, "--kind", help="Layout of a dataset, or scene (a new region)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Same seed, same bytes."),
    regions: int | None = typer.Option(None, "--regions", min=1, help="Number of regions (scene ids, UTM zones)."),
    size: int | None = typer.Option(None, "--size", min=16, help="Patch, image or scene size in pixels."),
    difficulty: Difficulty = typer.Option(
        Difficulty.DEFAULT,
        "--difficulty",
        help="default (well-separated classes) or hard (low contrast, noisy, mixed pixels, strong region shift).",
    ),
) -> None:
    """Write synthetic data in a real release layout (see geo/sample_data.py for its model)."""
    from geo.atomic import check_output_folder
    from geo.sample_data import generate

    check_output_folder(out, "OUT")
    try:
        written = generate(kind.value, out, seed=seed, regions=regions, size=size, difficulty=difficulty.value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(f"wrote {kind.value} sample data to {written}")


@app.command()
@reports_user_errors
def ingest(
    root: Path = typer.Argument(..., help="Dataset folder."),
    source: SourceName = typer.Option(..., "--source", help="Layout of ROOT (see README, Data it reads)."),
    classes: Path | None = typer.Option(
        None, "--classes", help="pairs: YAML/JSON file of label values, class names, colours and ignored values."
    ),
    out: Path = typer.Option(..., "--out", help="GeoParquet index to write."),
    strict: bool = typer.Option(False, "--strict", help="Stop at a bad file (exit 1, write nothing)."),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Parallel readers: processes where fork is safe (Linux), else threads (default: CPUs, at most 8).",
    ),
    grid: int = typer.Option(4, "--grid", min=1, help="deepglobe, pairs: cut each image into GRID x GRID tiles."),
) -> None:
    """Index every patch or tile of a dataset into a GeoParquet file; bad files are listed."""
    from geo.sources import get_source
    from pipeline.ingest import ingest as run_ingest

    try:
        layout = get_source(source.value, classes=classes)
    except ValueError as error:
        if isinstance(error, DataError):
            raise
        raise typer.BadParameter(str(error), param_hint="--classes") from None
    summary = run_ingest(layout, root, out, strict=strict, workers=workers, grid=grid)
    for entry in summary.skipped:
        typer.echo(f"skipped {entry.path}: {entry.reason}", err=True)
    typer.echo(
        f"wrote {summary.out}: {summary.rows} tiles in {summary.seconds:.1f} s "
        f"({summary.tiles_per_second:.0f} tiles/s), {len(summary.skipped)} files skipped"
    )


def _csv(text: str, cast: type, option: str) -> tuple:
    """'0,1,2' -> (0, 1, 2), or a usage error naming the option."""
    try:
        return tuple(cast(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list", param_hint=option) from None


@app.command()
@reports_user_errors
def regions(
    index: Path = typer.Argument(..., help="GeoParquet index written by `landcover ingest`."),
    by: RegionMethod = typer.Option(
        RegionMethod.METADATA, "--by", help="metadata (scene, UTM zone, --column) or kmeans."
    ),
    column: str | None = typer.Option(
        None,
        "--column",
        help="metadata: index column naming the regions; kmeans: column whose rows are clustered "
        "as one unit (default: the image id for DeepGlobe, else single tiles).",
    ),
    k: int | None = typer.Option(None, "--k", min=1, help="KMeans clusters (default: best silhouette)."),
    split: str | None = typer.Option(
        None, "--split", help="Fractions of regions for train,val,test [default: 0.6,0.2,0.2]."
    ),
    split_file: Path | None = typer.Option(
        None, "--split-file", help="YAML/JSON mapping train, val, test to lists of regions."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of KMeans and of the split."),
    out: Path = typer.Option(..., "--out", help="Index to write (may be INDEX itself)."),
    root: Path | None = RootOption,
) -> None:
    """Give every tile a region (metadata or KMeans) and every region a split."""
    from pipeline.regions import build_regions, read_split_file
    from tasks.splits import parse_fractions

    if split is not None and split_file is not None:
        raise typer.BadParameter("give --split or --split-file, not both", param_hint="--split")
    if split_file is not None:
        chosen: Sequence[float] | Mapping[str, Sequence[str]] = read_split_file(split_file)
    else:
        try:
            chosen = parse_fractions(split if split is not None else "0.6,0.2,0.2")
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--split") from None
    summary = build_regions(index, out, by=by.value, column=column, k=k, split=chosen, seed=seed, root=root)
    clustered = f" (k={summary.k}, clustered by {summary.unit})" if summary.k else ""
    typer.echo(f"wrote {summary.index_path}{clustered}")
    for name, count in summary.regions_per_split.items():
        typer.echo(f"  {name}: {count} regions, {summary.tiles_per_split[name]} tiles")
    if summary.plot_path:
        typer.echo(f"regions plot: {summary.plot_path}")


def _settings(**given: Any) -> dict[str, Any]:
    """The options the user gave (not None): the rest keep the defaults of the step's config."""
    return {name: value for name, value in given.items() if value is not None}


def _check_device(device: str) -> None:
    """cuda asked for without a GPU is a usage error now, not a failure once the data is loaded."""
    from models.device import pick_device

    try:
        pick_device(device)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None


ConfidenceOption = typer.Option(
    None,
    "--confidence",
    help="Also write the confidence here: one float32 band, the map's probability of the class it shows "
    "(a COG with a red-to-green QGIS style).",
)
DeviceOption = typer.Option(Device.AUTO, "--device", help="auto: cuda when torch sees a GPU, else cpu.")
TRAIN_DEFAULT = "Default: TrainConfig's (pipeline/train.py)."
EVALUATE_DEFAULT = "Default: EvaluateConfig's (pipeline/evaluate.py)."


@app.command()
@reports_user_errors
def train(
    index: Path = typer.Argument(..., help="Index with regions and splits (`landcover regions`)."),
    method: Method = typer.Option(
        Method["maml"],
        "--method",
        help="protonet (prototypes, no fine-tuning), reptile, anil (last layer adapts), metasgd "
        "(a rate per weight), mamlpp (MAML++), maml-ga (gradient agreement), maml, fomaml, r2d2 "
        "(ridge head) or pretrain.",
    ),
    task: Task = typer.Option(Task.SEGMENTATION, "--task", help="A class per tile or per pixel."),
    iterations: int | None = typer.Option(
        None, "--iterations", min=1, help=f"Outer steps (MAML) or batches (pretrain). {TRAIN_DEFAULT}"
    ),
    seed: int = typer.Option(0, "--seed"),
    size: Size = typer.Option(Size.TINY, "--size", help="Model size: tiny (CPU) or base (GPU)."),
    device: Device = DeviceOption,
    validate_every: int | None = typer.Option(
        None, "--validate-every", min=1, help=f"Iterations between validations (early stopping). {TRAIN_DEFAULT}"
    ),
    validation_episodes: int | None = typer.Option(
        None, "--validation-episodes", min=1, help=f"Validation episodes per validation. {TRAIN_DEFAULT}"
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", min=1, help=f"Iterations between resumable checkpoints. {TRAIN_DEFAULT}"
    ),
    n_way: int | None = typer.Option(None, "--n-way", min=1, help=f"Classes per episode. {TRAIN_DEFAULT}"),
    shots: int | None = typer.Option(
        None,
        "--shots",
        min=1,
        help=f"Support items (classification) or labelled pixels (segmentation) per class. {TRAIN_DEFAULT}",
    ),
    queries: int | None = typer.Option(
        None, "--queries", min=1, help=f"Classification: query tiles per class. {TRAIN_DEFAULT}"
    ),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Start from the weights of this run (e.g. MAML from pretrain)."
    ),
    inner_steps: int | None = typer.Option(
        None, "--inner-steps", min=0, help=f"Inner SGD steps per task (MAML family, Reptile). {TRAIN_DEFAULT}"
    ),
    inner_lr: float | None = typer.Option(
        None, "--inner-lr", help=f"Initial inner SGD rate (MAML family). {TRAIN_DEFAULT}"
    ),
    reptile_step: float | None = typer.Option(
        None,
        "--reptile-step",
        help=f"Reptile: fraction of the way to the adapted weights, annealed to 0. {TRAIN_DEFAULT}",
    ),
    reptile_inner_lr: float | None = typer.Option(
        None, "--reptile-inner-lr", help=f"Reptile: inner SGD rate. {TRAIN_DEFAULT}"
    ),
    second_order_from: float | None = typer.Option(
        None,
        "--second-order-from",
        help=f"MAML++: fraction of the run trained first-order before second order. {TRAIN_DEFAULT}",
    ),
    crop: int | None = typer.Option(
        None,
        "--crop",
        min=0,
        help="Segmentation: side in px of the windows that training episodes, pretraining batches and "
        f"validation episodes are cut from their tiles; 0 trains on whole tiles. {TRAIN_DEFAULT}",
    ),
    out: Path = typer.Option(..., "--out", help="Run directory; training resumes if it holds one."),
    root: Path | None = RootOption,
) -> None:
    """Train a few-shot learner (or pretrain a model); pick its fine-tuning budget on validation.

    Run again on the same --out after an interruption, it continues from the last checkpoint.
    """
    from pipeline.protocol import EpisodeShape
    from pipeline.train import TrainConfig
    from pipeline.train import train as run_train

    _check_device(device.value)
    whole_tiles: dict[str, Any] = {"crop": None} if crop == 0 else {}  # `_settings` drops a None
    try:
        shape = EpisodeShape(**_settings(n_way=n_way, k_shot=shots, q_queries=queries))
        config = TrainConfig(
            method=method.value,
            task=task.value,
            seed=seed,
            size=size.value,
            device=device.value,
            shape=shape,
            **_settings(
                iterations=iterations,
                validate_every=validate_every,
                validation_episodes=validation_episodes,
                checkpoint_every=checkpoint_every,
                init_from=None if init_from is None else str(init_from.resolve()),
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                reptile_step=reptile_step,
                reptile_inner_lr=reptile_inner_lr,
                second_order_from=second_order_from,
                crop=crop or None,
            ),
            **whole_tiles,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    summary = run_train(index, out, config, root=root)
    if summary.resumed_from:
        typer.echo(f"resumed from iteration {summary.resumed_from}")
    rate = "learned rates" if summary.finetune_lr is None else f"lr {summary.finetune_lr}"
    budget = (
        f"fine-tuning budget {summary.finetune_steps} steps, {rate}"
        if summary.adaptation.startswith("finetune")
        else f"adapts by its {summary.adaptation} (no fine-tuning)"
    )
    typer.echo(
        f"wrote {summary.run_dir}: best validation accuracy {summary.validation_accuracy:.3f} at "
        f"iteration {summary.best_iteration}; {budget}; {summary.iterations_per_second:.2f} iterations/s"
    )


@app.command()
@reports_user_errors
def evaluate(
    index: Path = typer.Argument(..., help="Index with regions and splits."),
    more_runs: list[Path] | None = typer.Argument(None, help="More run directories (--runs A B).", show_default=False),
    runs: list[Path] = typer.Option(..., "--runs", help="Run directories to compare: --runs A B or --runs A --runs B."),
    shots: str | None = typer.Option(
        None, "--shots", help=f"Shot counts to score, e.g. 0,1,2,5,10. {EVALUATE_DEFAULT}"
    ),
    episodes: int | None = typer.Option(
        None, "--episodes", min=1, help=f"Test episodes per shot count. {EVALUATE_DEFAULT}"
    ),
    validation_episodes: int | None = typer.Option(
        None,
        "--validation-episodes",
        min=1,
        help=f"Validation episodes to pick random init's budget. {EVALUATE_DEFAULT}",
    ),
    n_way: int | None = typer.Option(None, "--n-way", min=1, help=f"Classes per episode. {EVALUATE_DEFAULT}"),
    queries: int | None = typer.Option(
        None, "--queries", min=1, help=f"Classification: query tiles per class. {EVALUATE_DEFAULT}"
    ),
    protocol: Protocol | None = typer.Option(
        None,
        "--protocol",
        help="Segmentation episodes: scene (as adapt builds its support; the default) or episode (N-way, a few tiles).",
    ),
    seed: int = typer.Option(0, "--seed"),
    device: Device = DeviceOption,
    out: Path = typer.Option(..., "--out", help="Report folder."),
    root: Path | None = RootOption,
) -> None:
    """Score every run (fine-tuned and with a closed-form head), random init and the per-pixel
    classifier on the same test episodes; write a table and a plot."""
    from pipeline.evaluate import EvaluateConfig
    from pipeline.evaluate import evaluate as run_evaluate

    _check_device(device.value)
    try:
        config = EvaluateConfig(
            seed=seed,
            device=device.value,
            **_settings(
                shots=None if shots is None else _csv(shots, int, "--shots"),
                episodes=episodes,
                validation_episodes=validation_episodes,
                n_way=n_way,
                q_queries=queries,
                protocol=None if protocol is None else protocol.value,
            ),
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--shots" if "shots" in str(error) else None) from None
    report = run_evaluate(index, [*runs, *(more_runs or [])], out, config, root=root)
    typer.echo(report.files.table)
    typer.echo(f"results: {report.files.csv}\nreport: {report.files.markdown}\nplot: {report.files.plot}")


def _print_map(result, out: Path) -> None:
    """Where the map went and what it holds; a scene without CRS is called out."""
    from geo.export import style_path

    scene_map = result.scene_map
    typer.echo(f"map: {scene_map.classes} (style {scene_map.style}); classes: {', '.join(result.classes)}")
    if scene_map.probabilities:
        typer.echo(f"probabilities: {scene_map.probabilities}")
    if scene_map.confidence:
        typer.echo(f"confidence: {scene_map.confidence} (style {style_path(scene_map.confidence)})")
    if result.polygons:
        typer.echo(f"polygons: {result.polygons}")
    if result.adapted_dir:
        typer.echo(f"adapted model: {result.adapted_dir}")
    if result.item:
        typer.echo(f"STAC item: {result.item}")
    if not scene_map.georeferenced:
        typer.echo(f"note: the scene has no CRS; {out} is in pixel coordinates", err=True)


@app.command()
@reports_user_errors
def adapt(
    model: str = typer.Option(
        ..., "--model", help="Run directory from `landcover train`, or `pixel` (the per-pixel classifier)."
    ),
    image: Path = typer.Option(..., "--image", help="Scene GeoTIFF with the model's bands."),
    labels: Path = typer.Option(..., "--labels", help="Labelled points/polygons (GPKG, GeoJSON, SHP; any CRS)."),
    out: Path = typer.Option(..., "--out", help="Class map to write (Cloud-Optimized GeoTIFF)."),
    compare: list[str] = typer.Option(
        [],
        "--compare",
        help="More candidate runs to check against --model (repeat the option).",
    ),
    pixel: bool = typer.Option(
        True,
        "--pixel/--no-pixel",
        help="Also check the per-pixel classifier on the bands (default: yes).",
    ),
    pick: str = typer.Option(
        "best",
        "--pick",
        help=(
            "best: map with the best cross-validated candidate; first: with --model (fine-tuned); "
            "or a candidate's name, e.g. 'r2d2 head'."
        ),
    ),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Cross-validate the candidates on the labels and write MAP.report.json/.md."
    ),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds."),
    spacing: float = typer.Option(32, "--spacing", min=0, help="Labels closer than this (pixels) stay in one fold."),
    class_column: str = typer.Option("class", "--class-column", help="Column of class names or ids."),
    steps: int | None = typer.Option(None, "--steps", min=0, help="Fine-tuning steps (default: picked on validation)."),
    probabilities: Path | None = typer.Option(None, "--probabilities", help="Also write class probabilities here."),
    confidence: Path | None = ConfidenceOption,
    vector: Path | None = typer.Option(None, "--vector", help="Also write the map as polygons (GeoPackage)."),
    save_adapted: Path | None = typer.Option(None, "--save-adapted", help="Save the adapted model here."),
    suggest: int | None = typer.Option(
        None,
        "--suggest",
        help="Also suggest this many points where one more label would help most: where the map is least "
        "confident, spread apart and away from the labels (needs --suggest-out).",
    ),
    suggest_out: Path | None = typer.Option(
        None,
        "--suggest-out",
        help="GeoPackage for the suggested points, in the labels' CRS, with an empty class column to fill in.",
    ),
    suggest_spacing: float = typer.Option(
        32, "--suggest-spacing", min=0, help="Least pixels between suggestions, and from any label."
    ),
    device: Device = DeviceOption,
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Adapt to a new scene from a few labelled pixels, check every candidate on the labels, map the scene."""
    from pipeline.adapt import MapConfig, SuggestConfig
    from pipeline.adapt import adapt as run_adapt

    _check_device(device.value)
    if (suggest is None) != (suggest_out is None):
        given, missing = ("--suggest", "--suggest-out") if suggest_out is None else ("--suggest-out", "--suggest")
        raise typer.BadParameter(f"{given} needs {missing}", param_hint=given)
    try:
        suggestions = (
            None if suggest is None or suggest_out is None else SuggestConfig(suggest, suggest_out, suggest_spacing)
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--suggest") from None
    config = MapConfig(
        steps=steps,
        class_column=class_column,
        device=device.value,
        seed=seed,
        pick=pick,
        check=check,
        folds=folds,
        spacing=spacing,
        pixel=pixel,
    )
    result = run_adapt(
        model,
        image,
        labels,
        out,
        compare=compare,
        probabilities=probabilities,
        confidence=confidence,
        vector=vector,
        save_adapted=save_adapted,
        suggest=suggestions,
        config=config,
    )
    typer.echo(f"adapted on {result.labelled_pixels} labelled pixels in {result.support_windows} windows")
    if result.nodata_labels:
        typer.echo(f"note: {result.nodata_labels} labelled pixels lie on the scene's nodata and were ignored", err=True)
    if result.conflicting_labels:
        typer.echo(f"note: {result.conflicting_labels} pixels labelled with two classes were ignored", err=True)
    _print_check(result)
    _print_map(result, out)
    if result.suggestions is not None and suggest_out is not None:
        found = result.suggestions
        typer.echo(f"suggested {len(found)} points to label next: {suggest_out}")
        if len(found) < found.asked:
            fitted = f"only {len(found)} of the {found.asked} suggestions fit" if found else "no suggestion fits"
            typer.echo(
                f"note: {fitted} {suggest_spacing:g} px apart (and from the labels) on the scene's data; "
                "a smaller --suggest-spacing fits more",
                err=True,
            )


def _print_check(result) -> None:
    """Each candidate's cross-validated accuracy, which one mapped, and why an estimate is missing."""
    if result.report is None:
        typer.echo(f"map made by {result.chosen} (not checked: --no-check)")
        return
    for candidate in result.report.content["candidates"]:
        estimate = candidate["estimate"]
        figure = (
            "no estimate"
            if estimate is None
            else (
                f"{estimate['accuracy']:.3f} (95% {estimate['ci95'][0]:.3f}-{estimate['ci95'][1]:.3f}, "
                f"{estimate['held_out_labels']} held-out labels)"
            )
        )
        marker = "*" if candidate["name"] == result.chosen else " "
        typer.echo(f" {marker} {candidate['name']}: {figure}")
    typer.echo(f"map made by {result.chosen}; report: {result.report.markdown}")
    for note in result.report.content["notes"]:
        typer.echo(f"note: {note}", err=True)


@app.command()
@reports_user_errors
def predict(
    model: Path = typer.Option(..., "--model", help="Run or adapted-model directory."),
    image: Path = typer.Option(..., "--image", help="Scene GeoTIFF with the model's bands."),
    out: Path = typer.Option(..., "--out", help="Class map to write (Cloud-Optimized GeoTIFF)."),
    probabilities: Path | None = typer.Option(None, "--probabilities", help="Also write class probabilities here."),
    confidence: Path | None = ConfidenceOption,
    vector: Path | None = typer.Option(None, "--vector", help="Also write the map as polygons (GeoPackage)."),
    device: Device = DeviceOption,
) -> None:
    """Map a scene with a model as it is (e.g. one saved by `adapt --save-adapted`)."""
    from pipeline.adapt import MapConfig, predict_map

    _check_device(device.value)
    config = MapConfig(device=device.value)
    result = predict_map(
        model, image, out, probabilities=probabilities, confidence=confidence, vector=vector, config=config
    )
    _print_map(result, out)


@app.command()
@reports_user_errors
def catalog(
    folder: Path = typer.Argument(..., help="Folder searched, with its subfolders, for each map's MAP.stac.json."),
    out: Path | None = typer.Option(None, "--out", help="Catalog to write. Default: FOLDER/catalog.json."),
    title: str | None = typer.Option(None, "--title", help="Title and id of the catalog. Default: the folder's name."),
) -> None:
    """Gather the STAC Items that adapt and predict write beside their maps into one STAC Catalog."""
    from pipeline.catalog import build_catalog

    summary = build_catalog(folder, out, title=title)
    typer.echo(f"wrote {summary.path}: {len(summary.items)} STAC items")


if __name__ == "__main__":
    sys.exit(app())
