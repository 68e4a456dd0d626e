"""Sliding-window prediction on large scenes: throughput and peak memory against loading it whole.

    python -m benchmarks.predict_memory [--sizes 4096 8192] [--no-probabilities]

Each size is predicted in a fresh subprocess, so the peak RSS it reports is that run's own. The
model is a fixed per-pixel linear classifier (cheap, so the figures measure reading, stitching and
writing, not a network). Prints a Markdown table; `whole scene` is what holding the scene, its
scaled float32 copy, its scores and its probabilities in memory at once would take.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from geo.classes import ClassScheme, default_palette
from geo.windows import PredictBatch, predict_scene

BANDS = 3
CLASSES = 4
WINDOW, OVERLAP, BATCH = 256, 64, 8
SCHEME = ClassScheme("bench", tuple(f"class{i}" for i in range(CLASSES)), default_palette(CLASSES))
HEADER = (
    "| scene | bands | classes | window / overlap | probabilities | seconds | Mpx/s | peak RSS MiB "
    "| RSS growth MiB | whole scene MiB |\n|---|---|---|---|---|---|---|---|---|---|"
)


def write_large_scene(path: Path, size: int, *, bands: int = BANDS, strip: int = 512) -> Path:
    """A tiled uint16 UTM scene written strip by strip (smooth fields, a nodata corner)."""
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": bands,
        "dtype": "uint16",
        "nodata": 0,
        "crs": "EPSG:32633",
        "transform": from_origin(500_000, 5_000_000, 10, 10),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    cols = np.arange(size)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, strip):
            rows = np.arange(top, min(top + strip, size))[:, None]
            fields = [5000 + 4000 * np.sin((rows * (b + 1) + cols * (bands - b)) / 700) for b in range(bands)]
            pixels = np.stack(fields).astype(np.uint16)
            pixels[:, rows[:, 0] < size // 16, : size // 16] = 0  # nodata corner
            dst.write(pixels, window=Window(0, top, size, pixels.shape[1]))
    return path


def linear_classifier(bands: int = BANDS, classes: int = CLASSES, seed: int = 0) -> PredictBatch:
    """A fixed per-pixel linear model: scores = W @ pixel + b."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(classes, bands)).astype(np.float32) * 8
    bias = rng.normal(size=classes).astype(np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.einsum("kc,bchw->bkhw", weights, batch) + bias[None, :, None, None]

    return predict


def whole_scene_bytes(size: int, *, bands: int = BANDS, classes: int = CLASSES, probabilities: bool = True) -> int:
    """Memory to hold the uint16 scene, its float32 copy, float32 scores (and probabilities) at once."""
    pixels = size * size
    return pixels * (bands * 2 + bands * 4 + classes * 4 + (classes * 4 if probabilities else 0))


def measure(scene: Path, out_dir: Path, *, probabilities: bool) -> dict[str, float]:
    """Predict `scene` in this process; time and memory figures (RSS in bytes)."""
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = predict_scene(
        scene,
        linear_classifier(),
        out_dir / "classes.tif",
        scheme=SCHEME,
        window=WINDOW,
        overlap=OVERLAP,
        batch_size=BATCH,
        probabilities_path=out_dir / "probabilities.tif" if probabilities else None,
    )
    seconds = time.perf_counter() - start
    peak = peak_rss()
    size = result.grid.width
    return {
        "size": size,
        "seconds": seconds,
        "megapixels_per_second": size * size / 1e6 / seconds,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "whole_scene": whole_scene_bytes(size, probabilities=probabilities),
    }


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's VmHWM, not `getrusage().ru_maxrss`: the latter survives `execve`, so a child forked
    from a big parent (pytest after writing the scene) would report the parent's pages.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_in_subprocess(scene: Path, out_dir: Path, *, probabilities: bool) -> dict[str, float]:
    """`measure` in a fresh interpreter, so its peak RSS belongs to this prediction alone."""
    command = [sys.executable, "-m", "benchmarks.predict_memory", "--child", str(scene), str(out_dir)]
    if not probabilities:
        command.append("--no-probabilities")
    completed = subprocess.run(
        command, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def markdown_row(figures: dict[str, float], *, probabilities: bool) -> str:
    mib = 2**20
    return (
        f"| {figures['size']}x{figures['size']} | {BANDS} | {CLASSES} | {WINDOW} / {OVERLAP} "
        f"| {'yes' if probabilities else 'no'} | {figures['seconds']:.1f} | {figures['megapixels_per_second']:.2f} "
        f"| {figures['peak_rss'] / mib:.0f} | {(figures['peak_rss'] - figures['baseline_rss']) / mib:.0f} "
        f"| {figures['whole_scene'] / mib:.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--no-probabilities", dest="probabilities", action="store_false")
    parser.add_argument("--child", nargs=2, metavar=("SCENE", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]), probabilities=args.probabilities)))
        return
    print(HEADER)
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            scene = write_large_scene(Path(folder) / "scene.tif", size)
            figures = measure_in_subprocess(scene, Path(folder) / "out", probabilities=args.probabilities)
            print(markdown_row(figures, probabilities=args.probabilities), flush=True)


if __name__ == "__main__":
    main()
