"""Every pipeline step as a Prefect task: one call into `pipeline` (or `geo`), nothing more.

What the tasks add is orchestration: cache keys from the files they read (`flows.caching`),
persisted results so a later run in another process skips unchanged steps, and retries for the
steps that touch files. Torch-heavy modules are imported inside the task bodies, so importing the
flows (the CLI, a Dask worker, a test) stays quick and never needs a model library.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from flows.caching import cache_on
from geo.index import FileIndex
from geo.readers import SourceFile
from geo.sources.base import Source
from pipeline import ingest
from pipeline.config import evaluate_config, map_config, train_config
from pipeline.ingest import IngestPlan
from pipeline.report import ReportFiles


def is_io_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only what may pass on its own (a busy disk, a network share): an OSError.

    A `DataError` (a bad file of the user's) or a bug fails the same way every time.
    """
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


IO_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": is_io_error,
}
"""Options of every task that reads or writes files."""

PERSIST: dict[str, Any] = {"persist_result": True}


@task(name="sample-data", cache_policy=cache_on(writes=("out",)), **PERSIST, **IO_RETRIES)
def sample_data(kind: str, out: Path, seed: int, regions: int, size: int) -> Path:
    from geo.sample_data import generate

    return generate(kind, out, seed=seed, regions=regions, size=size)


@task(name="sample-scene", cache_policy=cache_on(writes=("out",)), **PERSIST, **IO_RETRIES)
def sample_scene(out: Path, seed: int) -> tuple[Path, Path]:
    """The image and labelled points of a generated new region."""
    from geo.sample_data import write_scene

    files = write_scene(out, seed=seed)
    return files.image, files.labels


@task(name="plan-ingest", **IO_RETRIES)
def plan_ingest(source: Source, root: Path, files_per_part: int) -> IngestPlan:
    """Not cached: listing the files is how a re-run learns about new or removed ones."""
    return ingest.plan_ingest(source, root, files_per_part=files_per_part)


@task(name="index-part", cache_policy=cache_on(), **PERSIST, **IO_RETRIES)
def index_part(source: Source, files: list[SourceFile], grid: int, num_classes: int) -> list[FileIndex]:
    return ingest.index_part(source, files, grid=grid, num_classes=num_classes)


@task(
    name="write-index",
    cache_policy=cache_on(writes=("out",), ignore=("plan", "parts")),
    **PERSIST,
    **IO_RETRIES,
)
def write_index(
    source: Source,
    root: Path,
    plan: IngestPlan,
    parts: list[list[FileIndex]],
    out: Path,
    strict: bool,
    grid: int,
) -> Path:
    """`source` and `root` are the cache key; the plan and the parts follow from them."""
    return ingest.finish_ingest(plan, parts, out, strict=strict, grid=grid).out


@task(name="regions", cache_policy=cache_on(writes=("out",)), **PERSIST, **IO_RETRIES)
def regions(index: Path, out: Path, settings: dict[str, Any]) -> Path:
    from pipeline.regions import build_regions

    return build_regions(index, out, **settings).index_path


@task(name="train", cache_policy=cache_on(writes=("out_dir",)), **PERSIST)
def train(index: Path, out_dir: Path, settings: dict[str, Any]) -> Path:
    from pipeline.train import train

    return train(index, out_dir, train_config(settings)).run_dir


@task(name="evaluate", cache_policy=cache_on(writes=("out_dir",)), **PERSIST)
def evaluate(index: Path, runs: dict[str, Path], out_dir: Path, settings: dict[str, Any]) -> ReportFiles:
    from pipeline.evaluate import evaluate

    return evaluate(index, list(runs.values()), out_dir, evaluate_config(settings)).files


@task(name="adapt", cache_policy=cache_on(writes=("out", "adapted", "extras", "suggest")), **PERSIST, **IO_RETRIES)
def adapt(
    model: Path,
    image: Path,
    labels: Path,
    out: Path,
    adapted: Path,
    settings: dict[str, Any],
    extras: dict[str, Path],
    suggest: dict[str, Any] | None,
) -> Path:
    """Map the new scene to `out` (with its style, report and STAC Item `MAP.stac.json`), the
    `extras` beside it (kind -> file: `pipeline.config.beside`) and, with `suggest`, the points to
    label next; return the adapted model, saved to `adapted` for `predict`."""
    from pipeline.adapt import SuggestConfig, adapt

    adapt(
        model,
        image,
        labels,
        out,
        save_adapted=adapted,
        probabilities=extras.get("probabilities"),
        confidence=extras.get("confidence"),
        vector=extras.get("vector"),
        suggest=SuggestConfig(**suggest) if suggest is not None else None,
        config=map_config(settings),
    )
    return adapted


@task(name="predict", cache_policy=cache_on(writes=("out", "extras")), **PERSIST, **IO_RETRIES)
def predict(model: Path, image: Path, out: Path, settings: dict[str, Any], extras: dict[str, Path]) -> Path:
    """Map `image` to `out` (`MAP.tif`, with its style and STAC Item `MAP.stac.json`) and the
    `extras` beside it."""
    from pipeline.adapt import predict_map

    predict_map(
        model,
        image,
        out,
        probabilities=extras.get("probabilities"),
        confidence=extras.get("confidence"),
        vector=extras.get("vector"),
        config=map_config(settings),
    )
    return out


@task(name="publish-report")
def publish_report(table: str, plot: Path, report: Path) -> None:
    """The accuracy table and the accuracy-vs-shots plot as artifacts of the flow run.

    The plot is inlined as a data URI, so the UI shows it without access to the output folder.
    """
    create_markdown_artifact(
        key="evaluation-table",
        markdown=f"{table}\n\nFull report: `{report}`",
        description="Accuracy per method and shot count (mean ± half-width of the 95% interval)",
    )
    encoded = base64.b64encode(plot.read_bytes()).decode("ascii")
    create_markdown_artifact(
        key="accuracy-vs-shots",
        markdown=f"![accuracy versus shots](data:image/png;base64,{encoded})\n\n`{plot}`",
        description="Accuracy versus labelled examples per class, for every method",
    )
