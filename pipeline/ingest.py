"""The ingest step: index a dataset's tiles into a GeoParquet file (CLI and Prefect flows call it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from geo.atomic import check_output_file
from geo.errors import DataError
from geo.index import FileIndex, IndexResult, Skipped, assemble, build_index, index_file, write_index
from geo.readers import SourceFile
from geo.sources import as_source
from geo.sources.base import Dataset, Source


@dataclass(frozen=True)
class IngestSummary:
    """What ingest wrote and how fast: rows, the files it left out, wall time."""

    out: Path
    rows: int
    skipped: list[Skipped]
    seconds: float
    tiles_per_second: float


def ingest(
    source: Source | str,
    root: str | Path,
    out: str | Path,
    *,
    strict: bool = False,
    workers: int | None = None,
    grid: int = 4,
    progress: bool = True,
) -> IngestSummary:
    """Index every tile under `root` and write the index to `out` (atomically).

    Bad files are left out and listed in the summary and the index metadata; with `strict`, the
    first bad file raises DataError (naming it and how many more there are) and nothing is written.
    Prints nothing but the progress bar (stderr).
    """
    start = time.time()
    check_output_file(out, "--out")
    result = build_index(source, root, workers=workers, progress=progress, grid=grid)
    return _save(result, out, strict=strict, start=start)


# --- the same step in pieces, for the Prefect flow that spreads files over Dask workers ---------


@dataclass(frozen=True)
class IngestPlan:
    """A dataset's files cut into parts of `files_per_part`; `start` is when listing began."""

    dataset: Dataset
    parts: list[list[SourceFile]]
    start: float


def plan_ingest(source: Source | str, root: str | Path, *, files_per_part: int = 32) -> IngestPlan:
    """List the dataset's files (sorted) and cut them into parts indexed one task each."""
    start = time.time()
    dataset = as_source(source).discover(Path(root).resolve())
    files = dataset.files
    parts = [files[i : i + files_per_part] for i in range(0, len(files), files_per_part)]
    return IngestPlan(dataset, parts, start)


def index_part(source: Source, files: list[SourceFile], *, grid: int, num_classes: int) -> list[FileIndex]:
    """Index rows of some of a dataset's files (see `geo.index.index_file`)."""
    return [index_file(source, file, grid=grid, num_classes=num_classes) for file in files]


def finish_ingest(
    plan: IngestPlan, parts: list[list[FileIndex]], out: str | Path, *, strict: bool = False, grid: int = 4
) -> IngestSummary:
    """Assemble the indexed parts in order and write the index, as `ingest` does."""
    result = assemble(plan.dataset, (index for part in parts for index in part), grid=grid)
    return _save(result, out, strict=strict, start=plan.start)


def _save(result: IndexResult, out: str | Path, *, strict: bool, start: float) -> IngestSummary:
    if strict and result.skipped:
        first, more = result.skipped[0], len(result.skipped) - 1
        raise DataError(first.path, first.reason + (f" (and {more} more bad files)" if more else ""))
    check_output_file(out, "--out")
    write_index(result.frame, out, result.metadata)
    seconds = time.time() - start
    rows = len(result.frame)
    return IngestSummary(Path(out), rows, result.skipped, seconds, rows / seconds if seconds > 0 else float("inf"))
