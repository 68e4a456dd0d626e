"""The pipeline as Prefect flows: one per step, and the end-to-end run that chains them.

Each flow only wires tasks from `flows.steps` together. The end-to-end flow reads its YAML config
when it runs (a scheduled deployment picks up edits to the file), keeps every cached result in
`<output>/.prefect-cache`, and hands ingest and prediction to Dask when asked to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
from prefect import flow, unmapped
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    PREFECT_TASKS_REFRESH_CACHE,
    temporary_settings,
)

from flows import steps
from flows.caching import CACHE_FOLDER
from flows.dask import dask_runner
from geo.errors import DataError
from geo.sources import get_source
from pipeline.config import (
    adapt_settings,
    beside,
    evaluate_settings,
    load_config,
    regions_settings,
    suggest_settings,
    train_settings,
)

if TYPE_CHECKING:
    from geo.index import FileIndex


@flow(name="landcover-ingest")
def ingest_flow(
    source: str,
    root: Path,
    out: Path,
    strict: bool = False,
    grid: int = 4,
    files_per_task: int = 32,
    classes: Path | None = None,
) -> Path:
    """Index a dataset, one task per part of its files, so a Dask runner spreads the reading.
    `classes`: the classes file of a source that takes one (pairs)."""
    layout = get_source(source, classes=classes)
    plan = steps.plan_ingest(layout, root, files_per_task)
    parts = steps.index_part.map(
        unmapped(layout), plan.parts, unmapped(grid), unmapped(plan.dataset.scheme.num_classes)
    )
    # the futures go in as they are: Prefect waits for them and passes their results
    return steps.write_index(layout, root, plan, cast("list[list[FileIndex]]", parts), out, strict, grid)


@flow(name="landcover-regions")
def regions_flow(index: Path, out: Path, settings: dict[str, Any]) -> Path:
    """Name each tile's region and split regions into train/val/test."""
    return steps.regions(index, out, settings)


@flow(name="landcover-meta-train")
def meta_train_flow(index: Path, runs: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """Train one model per named run (method and seed), one after the other on this machine."""
    return {name: steps.train(index, out_dir / name, settings) for name, settings in runs.items()}


@flow(name="landcover-evaluate")
def evaluate_flow(index: Path, runs: dict[str, Path], out_dir: Path, settings: dict[str, Any]) -> Path:
    """Score every run on the same held-out episodes; publish the table and plot as artifacts."""
    report = steps.evaluate(index, runs, out_dir, settings)
    steps.publish_report(report.table, report.plot, report.markdown)
    return report.markdown


@flow(name="landcover-adapt-predict")
def adapt_predict_flow(
    model: Path,
    image: Path,
    labels: Path,
    out: Path,
    adapted: Path,
    settings: dict[str, Any],
    scenes: dict[Path, Path] | None = None,
    extras: tuple[str, ...] = (),
    suggest: dict[str, Any] | None = None,
) -> list[Path]:
    """Adapt a trained model to a new region from its labelled pixels and map that scene to
    `out`; then map each of `scenes` (scene -> its map) with the adapted model, one task each.
    `extras` (of `MAP_EXTRAS`) are written beside every map; `suggest` (`SuggestConfig`'s
    settings) writes the points to label next on the adapted scene."""
    model = steps.adapt(model, image, labels, out, adapted, settings, beside(out, extras), suggest)
    scenes = scenes or {}
    maps = steps.predict.map(
        unmapped(model),
        list(scenes),
        list(scenes.values()),
        unmapped(settings),
        [beside(map_path, extras) for map_path in scenes.values()],
    )
    return [out, *maps.result()]


@dataclass
class EndToEndOutputs:
    """Where the run left its results."""

    index: Path
    regions: Path
    runs: dict[str, Path] = field(default_factory=dict)
    report: Path | None = None
    maps: list[Path] = field(default_factory=list)


@flow(name="landcover-end-to-end")
def end_to_end(
    config: str | None = None, dask_address: str | None = None, workers: int | None = None
) -> EndToEndOutputs:
    """Sample data (when the config names none) -> ingest -> regions -> train each method ->
    evaluate -> adapt to a new scene. Steps whose inputs did not change come from the cache."""
    settings = load_config(Path(config) if config else None)
    paths = settings.layout
    cache = settings.output / CACHE_FOLDER  # every step's result_storage
    data = settings.data
    with dask_runner(dask_address, workers) as runner:  # None keeps each flow's own (a thread pool)
        root = data.root or steps.sample_data.with_options(result_storage=cache)(
            data.sample_kind, paths.sample_data, **data.sample.model_dump()
        )
        index = ingest_flow.with_options(
            result_storage=cache,
            task_runner=runner,  # type: ignore[arg-type]  # prefect_dask's typing: see flows.dask
        )(data.source, root, paths.index, data.strict, data.grid, data.files_per_task, data.classes)
        regions = regions_flow.with_options(result_storage=cache)(index, paths.regions, regions_settings(settings))
        outputs = EndToEndOutputs(index=index, regions=regions)
        if not settings.methods:
            return outputs
        outputs.runs = meta_train_flow.with_options(result_storage=cache)(
            regions,
            {
                settings.run_name(method, seed): train_settings(settings, method, seed)
                for method in settings.methods
                for seed in settings.seeds
            },
            paths.runs,
        )
        outputs.report = evaluate_flow.with_options(result_storage=cache)(
            regions, outputs.runs, paths.evaluation, evaluate_settings(settings)
        )
        adapt = settings.adapt
        if adapt is None:
            return outputs
        image, labels = (
            (adapt.image, adapt.labels)
            if adapt.image is not None and adapt.labels is not None  # the config gives both or neither
            else steps.sample_scene.with_options(result_storage=cache)(paths.sample_scene, data.sample.seed)
        )
        outputs.maps = adapt_predict_flow.with_options(
            result_storage=cache,
            task_runner=runner,  # type: ignore[arg-type]  # prefect_dask's typing: see flows.dask
        )(
            outputs.runs[settings.adapt_run],
            image,
            labels,
            paths.adapted_map,
            paths.adapted_model,
            adapt_settings(settings),
            {scene: paths.prediction(scene) for scene in adapt.scenes},
            adapt.extras,
            suggest_settings(settings),
        )
    return outputs


class ServeError(RuntimeError):
    """Serving cannot start: no Prefect server to hold the schedule, or a bad cron string."""


def run_once(config: Path | None, *, dask_address: str | None, workers: int | None, refresh: bool) -> EndToEndOutputs:
    """Run the end-to-end flow now; `refresh` recomputes every step instead of reusing results.

    When the Prefect server stops during the run, the run stops with a DataError naming the
    output folder: every step that had completed is persisted in its `.prefect-cache`, so the
    next run reuses it and starts where this one stopped.
    """
    settings = load_config(config)  # a mistake in the file stops here, before Prefect starts
    with _one_server() as server, temporary_settings({PREFECT_TASKS_REFRESH_CACHE: refresh}):
        url = PREFECT_API_URL.value()
        try:
            return end_to_end(_absolute(config), dask_address, workers)
        except Exception as error:
            lost = _server_lost(error, server)
            if lost is None:
                raise
            raise DataError(
                settings.output,
                f"the Prefect server at {url} stopped during the run ({lost}); the steps that "
                f"completed are kept in {CACHE_FOLDER} here and the next `landcover run` reuses them",
            ) from None


OWN_SERVER_RETRIES = 1
"""Client retries of a request to the server a run started itself. A refused connection means
that server is gone for good (nothing restarts it), and Prefect's default of 5 retries with
exponential back-off would hold the run for minutes before saying so; a server the user runs
(PREFECT_API_URL) keeps the default, as it may come back."""


OWN_SERVER_STARTUP_SECONDS = 90
"""How long a run waits for the server it starts. Prefect's default (20 s) is too short on a busy
2-core machine, where the server's imports alone can take that long, and the run then fails
before it began."""


@contextlib.contextmanager
def _one_server() -> Iterator[Any]:
    """Without PREFECT_API_URL every process, Dask workers too, would start a temporary server of
    its own and the workers' task runs would be lost with it: start one and point all at it.
    Yields that server (None when PREFECT_API_URL names one)."""
    if PREFECT_API_URL.value():
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer  # the server's code: import late

    server = SubprocessASGIServer()
    server.start(timeout=max(OWN_SERVER_STARTUP_SECONDS, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_CLIENT_MAX_RETRIES: OWN_SERVER_RETRIES}):
        yield server


def _server_lost(error: BaseException, server: Any) -> str | None:
    """Why the run lost its Prefect server, when `error` comes from that; None otherwise."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, httpx.TransportError):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    process = getattr(server, "server_process", None)
    if process is not None and process.poll() is not None:
        return f"its process exited with status {process.returncode}"
    return None


def serve(
    cron: str,
    *,
    name: str,
    config: Path | None,
    dask_address: str | None,
    workers: int | None,
) -> None:
    """Serve the end-to-end flow on a cron schedule until interrupted (the schedule then pauses).

    Needs a Prefect server (PREFECT_API_URL): the ephemeral one of a plain run takes no schedules.
    """
    load_config(config)  # the file's mistakes first: they are the user's to fix whatever the server
    if not PREFECT_API_URL.value():
        raise ServeError(
            "no Prefect server: start one with `prefect server start`, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    try:
        schedule = CronSchedule(cron=cron)
    except ValueError:
        raise ServeError(f"{cron!r} is not a cron schedule (e.g. '0 3 * * *')") from None
    try:
        end_to_end.serve(
            name=name,
            schedules=[schedule],
            parameters={"config": _absolute(config), "dask_address": dask_address, "workers": workers},
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    except httpx.ConnectError:
        raise ServeError(f"cannot reach the Prefect server at {PREFECT_API_URL.value()}") from None


def _absolute(config: Path | None) -> str | None:
    """Scheduled runs may start in another folder: pass the config by absolute path."""
    return str(config.resolve()) if config is not None else None
