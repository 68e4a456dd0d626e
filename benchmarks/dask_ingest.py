"""Ingest throughput of the Prefect ingest flow on a local Dask cluster of 1 and 2 worker processes.

    .venv/bin/python -m benchmarks.dask_ingest [--regions 4] [--size 256] [--files-per-task 32]

Generates SEN12MS-layout sample data (`regions` scene ids x 2 seasons x 64 patches), then indexes
it three times: in-process with one thread (`pipeline.ingest.ingest`, the baseline), and with
`flows.flows.ingest_flow` on a local cluster of 1 and of 2 worker processes (one thread each).
Each flow run starts with an empty result cache, so every file is read; the cluster is started,
and its workers have imported the project, before the clock starts. Flows run against a temporary
Prefect server, so the user's Prefect database is left alone. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
from pathlib import Path

from distributed import Client
from prefect.testing.utilities import prefect_test_harness

from flows.dask import dask_runner
from flows.flows import ingest_flow
from geo.index import read_index
from geo.sample_data import write_sen12ms
from pipeline.ingest import ingest

HEADER = (
    "| ingest of SEN12MS patches | tiles | in-process, 1 thread (tiles/s) "
    "| flow, 1 Dask worker (tiles/s) | flow, 2 Dask workers (tiles/s) | 2 vs 1 worker |\n"
    "|---|---|---|---|---|---|"
)


def flow_seconds(root: Path, folder: Path, *, workers: int, files_per_task: int) -> float:
    """Wall time of one ingest flow run on a fresh local cluster of `workers` processes, whose
    workers have imported the project (seconds of start-up, paid once per cluster) already."""
    with dask_runner(workers=workers) as runner:
        assert runner is not None
        with Client(runner.address) as client:
            client.run(importlib.import_module, "flows.steps")
        start = time.perf_counter()
        ingest_flow.with_options(
            task_runner=runner,  # type: ignore[arg-type]  # prefect_dask's typing: see flows.dask
            result_storage=folder / f"cache-{workers}",
        )("sen12ms", root, folder / f"flow-{workers}.parquet", files_per_task=files_per_task)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=4, help="scene ids (x 2 seasons x 64)")
    parser.add_argument("--size", type=int, default=256, help="patch size in pixels")
    parser.add_argument("--files-per-task", type=int, default=32, help="files per ingest task")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network needed

    with (
        tempfile.TemporaryDirectory(prefix="dask-ingest-bench-") as scratch,
        prefect_test_harness(server_startup_timeout=180),
    ):
        folder = Path(scratch)
        root = write_sen12ms(folder / "sen12ms", seed=0, regions=args.regions, size=args.size)
        baseline = ingest("sen12ms", root, folder / "in-process.parquet", workers=1, progress=False)
        seconds = {
            workers: flow_seconds(root, folder, workers=workers, files_per_task=args.files_per_task)
            for workers in (1, 2)
        }
        assert all(
            read_index(folder / f"flow-{workers}.parquet")[0].equals(read_index(baseline.out)[0]) for workers in seconds
        ), "the flow's index differs from the in-process one"
    rate = {workers: baseline.rows / value for workers, value in seconds.items()}
    print(HEADER)
    print(
        f"| {args.size} px, {args.files_per_task} files per task | {baseline.rows} "
        f"| {baseline.tiles_per_second:.0f} | {rate[1]:.0f} | {rate[2]:.0f} "
        f"| {rate[2] / rate[1]:.2f}x |"
    )


if __name__ == "__main__":
    main()
