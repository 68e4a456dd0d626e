"""Ingest throughput on SEN12MS-layout patches of the real size (256 px, 13 bands), 1 vs 2 threads.

    .venv/bin/python -m benchmarks.ingest_throughput [--regions 4] [--keep DIR]

Generates `regions` scene ids x 2 seasons x 64 patches (512 by default, about 1.4 GB), ingests
them once with each worker count and prints a Markdown table row. The files were just written,
so they are read from the page cache: this measures decoding and statistics, not the disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from geo.sample_data import write_sen12ms
from pipeline.ingest import IngestSummary, ingest

HEADER = (
    "| benchmark | tiles | 1 worker (tiles/s) | 2 workers (tiles/s) | speed-up | CPU ms/tile |\n"
    "|---|---|---|---|---|---|"
)


@dataclass(frozen=True)
class Run:
    """One ingest: its summary and the CPU time this process spent (threads included)."""

    summary: IngestSummary
    cpu_seconds: float


def measure(folder: Path, *, regions: int = 4, size: int = 256, workers: tuple[int, ...] = (1, 2)) -> list[Run]:
    """Write the data under `folder`, then ingest it once per worker count."""
    root = write_sen12ms(folder / "sen12ms", seed=0, regions=regions, size=size)
    runs = []
    for count in workers:
        start = time.process_time()
        summary = ingest("sen12ms", root, folder / f"index-{count}.parquet", workers=count, progress=False)
        runs.append(Run(summary, time.process_time() - start))
    return runs


def markdown_row(size: int, runs: list[Run]) -> str:
    """CPU ms per tile does not depend on what else the machine runs; tiles/s does."""
    one, two = (run.summary for run in runs)
    cpu_ms = 1000 * runs[0].cpu_seconds / one.rows
    return (
        f"| ingest SEN12MS {size} px patches (s2 + lc) | {one.rows} | {one.tiles_per_second:.0f} "
        f"| {two.tiles_per_second:.0f} | {two.tiles_per_second / one.tiles_per_second:.2f}x "
        f"| {cpu_ms:.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=4, help="scene ids (x 2 seasons x 64 patches)")
    parser.add_argument("--size", type=int, default=256, help="patch size in pixels")
    parser.add_argument("--keep", type=Path, help="write here and keep the data (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as scratch:
        runs = measure(args.keep or Path(scratch), regions=args.regions, size=args.size)
    print(HEADER)
    print(markdown_row(args.size, runs))


if __name__ == "__main__":
    main()
