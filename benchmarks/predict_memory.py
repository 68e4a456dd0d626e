"""Sliding-window prediction with the real U-Nets: the map's speed against the bare forward pass, and peak memory.

    python -m benchmarks.predict_memory [--device cpu|cuda|auto] [--models tiny base] [--sizes 4096]
        [--base-sizes 2048] [--memory-sizes 8192] [--no-linear] [--sequential]

A 13-band uint16 scene (tiled, deflate, a nodata corner) of each size is written once; each model
and size is measured in a fresh subprocess, so memory figures belong to that prediction alone. In
one subprocess, on the same scene and the same windows (256 px, overlap 64, batch 8):

- forward: the bare network over exactly the batches `predict_scene` feeds it
  (`geo.windows.window_batches`, each read and scaled before the clock starts; timed: the batch
  onto the device, the forward under `torch.inference_mode` and the project's autocast (bf16 on
  CUDA) in the chunks `models.finetune.predict` runs it in (`models.device.forward_batch`: 2
  windows at a time on a CPU), the device synchronised). Timed first and again after each map:
  each map / forward ratio is against the mean of the forward passes just before and after it,
  since the machine's speed drifts over minutes; the forward column is the mean of all;
- map: `predict_scene` (reader and writer threads) with the network called the way `landcover
  predict` calls it (`models.finetune.predict`, probabilities over the scheme's classes, as
  pipeline/adapt.py's `_map` builds it), writing the class-map COG;
- with `--sequential`, the same map with every stage in the caller's thread;
- map + probabilities: the map and the float32 probability COG (`--probabilities`).

Mpx/s are scene pixels per second for all of them, so map / forward is the share of the
network's own speed the map keeps. The U-Nets have random weights (speed does not depend on
them), 13 bands, 10 classes and band standardisation as a trained run has; torch uses
`torch.get_num_threads()` threads (by default one per core), shown in the table, and the map's
reader and writer threads share the same cores. The network is warmed up on one batch before
anything is timed. RSS growth is the peak resident memory during a phase (Linux VmHWM, reset
before each phase) minus the resident memory just before it, with the model loaded and warmed up:
it includes the network's activations. `whole scene` is what holding the scene, its float32 copy,
its scores and probabilities at once would take. `--memory-sizes` maps with probabilities only
(no forward pass) with the tiny U-Net. Rows for a per-pixel linear model (same scene, 13 bands ->
10 classes: reading, stitching and writing alone) come first unless `--no-linear`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from geo.classes import ClassScheme, default_palette
from geo.windows import PredictBatch, predict_scene, softmax, window_batches

BANDS = 13
CLASSES = 10
WINDOW, OVERLAP, BATCH = 256, 64, 8
SCHEME = ClassScheme("bench", tuple(f"class{i}" for i in range(CLASSES)), default_palette(CLASSES))
MODELS = ("linear", "tiny", "base")
PHASES = ("forward", "map", "sequential", "probabilities")
"""`sequential`: the map with every stage in one thread (`predict_scene(pipelined=False)`)."""
MIB = 2**20
SPEED_HEADER = (
    "| model | scene | device | torch threads | forward Mpx/s | map Mpx/s | map / forward "
    "| map in one thread Mpx/s | map + probabilities Mpx/s | with probabilities / forward "
    "| peak RSS growth MiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
)
MEMORY_HEADER = (
    "| model | scene | probabilities | seconds | Mpx/s | RSS before MiB | peak RSS MiB | RSS growth MiB "
    "| whole scene MiB |\n|---|---|---|---|---|---|---|---|---|"
)


def write_large_scene(path: Path, size: int, *, bands: int = BANDS, strip: int = 256) -> Path:
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
    """A fixed per-pixel linear model: probabilities = softmax(W @ pixel + b)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(classes, bands)).astype(np.float32) * 8
    bias = rng.normal(size=classes).astype(np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        return softmax(np.einsum("kc,bchw->bkhw", weights, batch) + bias[None, :, None, None])

    return predict


def whole_scene_bytes(size: int, *, bands: int = BANDS, classes: int = CLASSES, probabilities: bool = True) -> int:
    """Memory to hold the uint16 scene, its float32 copy, float32 scores (and probabilities) at once."""
    pixels = size * size
    return pixels * (bands * 2 + bands * 4 + classes * 4 + (classes * 4 if probabilities else 0))


# --- in the measuring subprocess --------------------------------------------------------------


@dataclasses.dataclass
class Network:
    """A model as `landcover predict` runs it, and its bare forward pass."""

    name: str
    predict_batch: PredictBatch
    forward: Callable[[np.ndarray], None] | None
    """Runs the network on a batch and waits for the device; None for the linear model."""
    device: str
    threads: int
    parameters: int


def network(name: str, device_name: str, bands: int = BANDS) -> Network:
    """`name` in MODELS for `bands` input bands, random weights on `device_name`, warmed up on one batch."""
    if name == "linear":
        return Network(name, linear_classifier(bands), None, "cpu", 1, bands * CLASSES + CLASSES)
    import torch

    from models.backbones import arch_preset, build_model
    from models.device import autocast, forward_batch, pick_device
    from models.finetune import predict

    device = pick_device(device_name)
    config = dataclasses.replace(
        arch_preset(name, "segmentation", bands, CLASSES),  # type: ignore[arg-type]  # checked by argparse
        input_mean=(0.5,) * bands,
        input_std=(0.25,) * bands,
    )
    model = build_model(config, seed=0).to(device).eval()
    class_ids = np.arange(CLASSES)

    def predict_batch(batch: np.ndarray) -> np.ndarray:  # as pipeline/adapt.py's `_map` builds it
        return predict(model, batch, class_ids, batch_size=BATCH)

    def forward(batch: np.ndarray) -> None:  # in the chunks `predict` runs the network in
        step = forward_batch(device, batch.shape, len(batch))
        with torch.inference_mode(), autocast(device):
            for start in range(0, len(batch), step):
                model(torch.from_numpy(batch[start : start + step]).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    forward(np.random.default_rng(0).random((BATCH, bands, WINDOW, WINDOW), dtype=np.float32))
    predict_batch(np.random.default_rng(1).random((BATCH, bands, WINDOW, WINDOW), dtype=np.float32))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return Network(name, predict_batch, forward, str(device), torch.get_num_threads(), parameters)


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (since the last `reset_peak_rss`).

    Linux's VmHWM, not `getrusage().ru_maxrss`: the latter survives `execve`, so a child forked
    from a big parent (pytest after writing the scene) would report the parent's pages.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0); elsewhere the peak stays the process's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def phase(figures: dict[str, Any], name: str, size: int) -> Iterator[dict[str, float]]:
    """Time a phase (wall clock, unless the body sets `seconds` in what it is given) and record its
    Mpx/s and RSS figures into `figures[name]`."""
    reset_peak_rss()
    before = current_rss()
    timing: dict[str, float] = {}
    start = time.perf_counter()
    yield timing
    seconds = timing.get("seconds", time.perf_counter() - start)
    figures[name] = {
        "seconds": seconds,
        "megapixels_per_second": size * size / 1e6 / seconds,
        "rss_before": before,
        "peak_rss": peak_rss(),
        "rss_growth": peak_rss() - before,
    }


def measure(
    scene: Path, out_dir: Path, *, model: str = "linear", phases: tuple[str, ...] = ("map",), device: str = "cpu"
) -> dict[str, Any]:
    """Measure `phases` (of PHASES) of `model` on `scene` in this process; RSS figures in bytes."""
    with rasterio.open(scene) as src:
        size, bands = src.width, src.count
    net = network(model, device, bands)
    figures: dict[str, Any] = {
        "model": model,
        "size": size,
        "bands": bands,
        "device": net.device,
        "threads": net.threads,
        "parameters": net.parameters,
    }
    forwards: list[float] = []
    """Seconds of each forward pass over the scene. With "forward" in `phases` one is timed
    first and one after each map, so that each map is compared with the forward passes just
    before and after it (the machine's speed drifts over minutes)."""
    timed_forward = "forward" in phases
    if timed_forward and net.forward is None:
        raise ValueError("the linear model has no forward pass to time")
    order = [name for name in phases if name != "forward"]
    if timed_forward:
        order = ["forward", *[step for name in order for step in (name, "forward")]]
    for number, name in enumerate(order):
        with phase(figures, name, size) as timing:
            if name == "forward":
                assert net.forward is not None
                timing["seconds"] = time_forward(net.forward, scene)
                forwards.append(timing["seconds"])
                if number:
                    figures[f"{order[number - 1]}_forward_after"] = forwards[-1]
                if number + 1 < len(order):
                    figures[f"{order[number + 1]}_forward_before"] = forwards[-1]
            else:
                target = out_dir / name
                predict_scene(
                    scene,
                    net.predict_batch,
                    target / "classes.tif",
                    scheme=SCHEME,
                    window=WINDOW,
                    overlap=OVERLAP,
                    batch_size=BATCH,
                    probabilities_path=target / "probabilities.tif" if name == "probabilities" else None,
                    pipelined=name != "sequential",
                )
        if name != "forward":
            shutil.rmtree(out_dir / name)  # an 8192² probability COG is gigabytes
    if forwards:
        figures["forward"]["seconds"] = float(np.mean(forwards))
        figures["forward"]["megapixels_per_second"] = size * size / 1e6 / figures["forward"]["seconds"]
    return figures


def time_forward(forward: Callable[[np.ndarray], None], scene: Path) -> float:
    """Seconds the network alone takes over the batches `predict_scene` feeds it (each batch read
    and scaled before its clock starts)."""
    seconds = 0.0
    for batch in window_batches(scene, window=WINDOW, overlap=OVERLAP, batch_size=BATCH):
        start = time.perf_counter()
        forward(batch)
        seconds += time.perf_counter() - start
    return seconds


def measure_in_subprocess(
    scene: Path,
    out_dir: Path,
    *,
    model: str = "linear",
    phases: tuple[str, ...] = ("map",),
    device: str = "cpu",
) -> dict[str, Any]:
    """`measure` in a fresh interpreter, so its memory figures belong to this prediction alone."""
    spec = {"scene": str(scene), "out_dir": str(out_dir), "model": model, "phases": list(phases), "device": device}
    command = [sys.executable, "-m", "benchmarks.predict_memory", "--child", json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the tables -------------------------------------------------------------------------------


def speed_row(figures: dict[str, Any]) -> str:
    def speed(name: str) -> str:
        return f"{figures[name]['megapixels_per_second']:.2f}" if name in figures else "–"

    def ratio(name: str) -> str:
        """The map's speed over the mean of the forward passes timed just before and after it."""
        if name not in figures or "forward" not in figures:
            return "–"
        around = [figures[f"{name}_forward_before"], figures[f"{name}_forward_after"]]
        return f"{np.mean(around) / figures[name]['seconds']:.0%}"

    growth = max(figures[name]["rss_growth"] for name in PHASES if name in figures)
    return (
        f"| {figures['model']} ({figures['parameters'] / 1e6:.2f} M) | {figures['size']}² ({figures['bands']} bands) "
        f"| {figures['device']} | {figures['threads'] if figures['model'] != 'linear' else '–'} "
        f"| {speed('forward')} | {speed('map')} | {ratio('map')} | {speed('sequential')} "
        f"| {speed('probabilities')} | {ratio('probabilities')} | {growth / MIB:.0f} |"
    )


def memory_row(figures: dict[str, Any], name: str) -> str:
    run = figures[name]
    whole = whole_scene_bytes(figures["size"], bands=figures["bands"], probabilities=name == "probabilities")
    return (
        f"| {figures['model']} | {figures['size']}² ({figures['bands']} bands) "
        f"| {'yes' if name == 'probabilities' else 'no'} | {run['seconds']:.1f} "
        f"| {run['megapixels_per_second']:.2f} | {run['rss_before'] / MIB:.0f} | {run['peak_rss'] / MIB:.0f} "
        f"| {run['rss_growth'] / MIB:.0f} | {whole / MIB:.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default: cpu)")
    parser.add_argument("--models", nargs="+", choices=MODELS[1:], default=list(MODELS[1:]))
    parser.add_argument("--sizes", type=int, nargs="*", default=[4096], help="scene sizes for the tiny U-Net")
    parser.add_argument("--base-sizes", type=int, nargs="*", default=[2048], help="scene sizes for the base U-Net")
    parser.add_argument(
        "--memory-sizes", type=int, nargs="*", default=[8192], help="tiny U-Net, map with probabilities only"
    )
    parser.add_argument("--no-linear", dest="linear", action="store_false", help="leave out the linear-model rows")
    parser.add_argument(
        "--sequential", action="store_true", help="also map in one thread (pipelined=False), for the U-Net rows"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        figures = measure(
            Path(spec["scene"]),
            Path(spec["out_dir"]),
            model=spec["model"],
            phases=tuple(spec["phases"]),
            device=spec["device"],
        )
        print(json.dumps(figures))
        return
    network_phases = tuple(name for name in PHASES if args.sequential or name != "sequential")
    runs: list[tuple[str, int, tuple[str, ...]]] = []
    for size in args.sizes:
        runs += [("linear", size, ("map", "probabilities"))] if args.linear else []
        runs += [("tiny", size, network_phases)] if "tiny" in args.models else []
    runs += [("base", size, network_phases) for size in args.base_sizes if "base" in args.models]
    memory = [("tiny", size, ("probabilities",)) for size in args.memory_sizes]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start\n")
    print(SPEED_HEADER, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        scenes: dict[int, Path] = {}
        for model, size, phases in [*runs, *memory]:
            if size not in scenes:
                scenes[size] = write_large_scene(Path(folder) / f"scene{size}.tif", size)
            figures = measure_in_subprocess(
                scenes[size], Path(folder) / "out", model=model, phases=phases, device=args.device
            )
            results.append((figures, phases))
            if phases != ("probabilities",):
                print(speed_row(figures), flush=True)
    print(f"\n{MEMORY_HEADER}")
    for figures, phases in results:
        for name in phases:
            if name in ("map", "probabilities") and figures["model"] == "tiny":
                print(memory_row(figures, name))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
