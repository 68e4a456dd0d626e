"""Ingest throughput on SEN12MS-layout patches of the release's size (256 px; 13-band s2, lc, s1).

    .venv/bin/python -m benchmarks.ingest_throughput [--workers 0 1] [--repeat 3] [--data DIR]
        [--baseline OTHER_CHECKOUT ...]

Generates `regions` scene ids x 2 seasons x `patches` patches (512 by default, about 1.4 GB;
kept and reused with `--data`), then times `pipeline.ingest.ingest` over them (listing, reading,
statistics, writing the index) once per worker count per repeat, each in a fresh process, the
variants taking turns so that they share whatever else the machine is doing. Workers `0` means
ingest's default (one reader per core, at most 8). `--baseline DIR` measures the code of another
checkout (e.g. `git worktree add /tmp/before <commit>`) in the same run, the same way.

The files were just written, so they are read from the page cache: this measures decoding and
statistics, not the disk. Prints a Markdown table (best and median patches/s of the repeats, and
the CPU time per patch of all threads and reader processes, which depends far less than patches/s
on other work), the load average before and after, and whether issue 13's target is met. On a
shared machine the kernel's per-session scheduling (autogroup) caps what a second reader can add:
take the figure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from geo.sample_data import write_sen12ms

MEASURE = """
import json, os, sys, time
from pathlib import Path
from pipeline.ingest import ingest
root, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) or None
def cpu_time():  # this process's threads and its finished child processes (ingest's readers)
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system
wall, cpu = time.perf_counter(), cpu_time()
summary = ingest("sen12ms", root, out, workers=workers, progress=False)
wall, cpu = time.perf_counter() - wall, cpu_time() - cpu
print(json.dumps({"rows": summary.rows, "skipped": len(summary.skipped), "wall": wall, "cpu": cpu}))
"""
"""One timed ingest in a fresh process (argv: root, index path, workers; 0 = ingest's default)."""


@dataclass(frozen=True)
class Variant:
    """Whose code (None: this checkout) with how many workers (0: ingest's default)."""

    code: Path | None
    workers: int

    def label(self) -> str:
        workers = f"default ({default_workers()})" if self.workers == 0 else str(self.workers)
        return f"| {'this checkout' if self.code is None else self.code} | {workers} "


@dataclass(frozen=True)
class Run:
    rows: int
    wall: float
    cpu: float


def default_workers() -> int:
    """What `geo.index.build_index` uses when given no worker count."""
    return min(8, os.cpu_count() or 1)


def dataset(folder: Path, *, regions: int, patches: int, size: int) -> Path:
    """The SEN12MS-layout data under `folder`, written unless a complete copy is already there."""
    root = folder / f"sen12ms-{regions}x2x{patches}-{size}px"
    expected = regions * 2 * patches
    if len(list(root.glob("*/s2_*/*.tif"))) != expected:
        write_sen12ms(root, seed=0, regions=regions, size=size, patches_per_region=patches)
    return root


def measure(variant: Variant, root: Path, out: Path) -> Run:
    """One ingest of `root` in a fresh Python process running `variant.code` (PYTHONPATH first)."""
    env = dict(os.environ)
    cwd = None
    if variant.code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(variant.code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cwd = variant.code
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), str(out), str(variant.workers)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"ingest with {variant} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["skipped"]:
        raise SystemExit(f"ingest with {variant} skipped {result['skipped']} files")
    return Run(result["rows"], result["wall"], result["cpu"])


def table(runs: dict[Variant, list[Run]]) -> str:
    lines = [
        "| code | workers | patches | patches/s (best) | patches/s (median) | CPU ms/patch (median) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, results in runs.items():
        rates = [run.rows / run.wall for run in results]
        cpu_ms = statistics.median(1000 * run.cpu / run.rows for run in results)
        lines.append(
            f"{variant.label()}| {results[0].rows} | {max(rates):.0f} | {statistics.median(rates):.0f} | {cpu_ms:.1f} |"
        )
    return "\n".join(lines)


def load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=4, help="scene ids (x 2 seasons x --patches)")
    parser.add_argument("--patches", type=int, default=64, help="patches per scene and season")
    parser.add_argument("--size", type=int, default=256, help="patch size in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="worker counts; 0 = ingest's default")
    parser.add_argument("--repeat", type=int, default=3, help="timed ingests per variant")
    parser.add_argument("--data", "--keep", type=Path, help="write the data here and keep it (reused when complete)")
    parser.add_argument("--baseline", type=Path, nargs="*", default=[], help="other checkouts to measure alike")
    args = parser.parse_args(argv)
    variants = [Variant(code, workers) for code in (None, *args.baseline) for workers in args.workers]
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as scratch:
        root = dataset(args.data or Path(scratch), regions=args.regions, patches=args.patches, size=args.size)
        before = load()
        runs: dict[Variant, list[Run]] = {variant: [] for variant in variants}
        for _ in range(args.repeat):
            for variant in variants:
                runs[variant].append(measure(variant, root, Path(scratch) / "index.parquet"))
        after = load()
    print(
        f"ingest of {args.regions * 2 * args.patches} SEN12MS-layout patches of {args.size} px, "
        f"{os.cpu_count()} CPUs, load average {before} before, {after} after\n"
    )
    print(table(runs))
    if Variant(None, 0) in runs:
        best = max(run.rows / run.wall for run in runs[Variant(None, 0)])
        print(f"\nissue 13's target, >= 100 patches/s with the default workers: {'met' if best >= 100 else 'not met'}")


if __name__ == "__main__":
    main()
