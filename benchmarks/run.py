"""`make bench [DEVICE=cuda]`: every speed and memory benchmark of a device in one run; results go
to BENCHMARKS.md by hand.

    python -m benchmarks.run [--device cpu|cuda|auto]

`cpu` (the default): ingest, ingest on Dask workers, meta-training speed and crops against
whole patches, the MAML step against `higher`, prediction speed and memory. `cuda`: the GPU
figures alone, in minutes on any machine with a GPU: meta-steps/s of the tiny and base U-Nets
in bf16 with peak GPU memory (on 32 px and 96 px tiles), the MAML step against `higher`, and
prediction Mpx/s of both U-Nets on a 4096² scene (forward pass, map, map with probabilities) with
the process's peak memory. `auto` is `cuda` when torch sees a GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from benchmarks import dask_ingest, ingest_throughput, maml_step, meta_training, predict_memory
from models.device import pick_device


def cpu_benchmarks() -> list[tuple[str, Callable[[], None]]]:
    return [
        ("Ingest throughput", lambda: ingest_throughput.main([])),
        ("Ingest on Dask workers", lambda: dask_ingest.main([])),
        ("Meta-training speed", lambda: meta_training.main(["--device", "cpu"])),
        ("MAML meta-step against higher", lambda: maml_step.main(["--device", "cpu"])),
        ("Prediction speed and memory", lambda: predict_memory.main(["--device", "cpu", "--sizes", "4096"])),
    ]


def gpu_benchmarks(device: str) -> list[tuple[str, Callable[[], None]]]:
    def steps(tile: int) -> Callable[[], None]:
        return lambda: meta_training.main(
            ["--part", "steps", "--device", device, "--size", "tiny", "base", "--tile", str(tile)]
        )

    return [
        ("Meta-training speed on the GPU, 32 px tiles", steps(32)),
        ("Meta-training speed on the GPU, 96 px crops", steps(96)),
        ("MAML meta-step against higher on the GPU", lambda: maml_step.main(["--device", device])),
        (
            "Prediction speed and memory on the GPU",
            lambda: predict_memory.main(
                ["--device", device, "--sizes", "4096", "--base-sizes", "4096", "--memory-sizes", "--no-linear"]
            ),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default: cpu)")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    runs = cpu_benchmarks() if device.type == "cpu" else gpu_benchmarks(str(device))
    for title, run in runs:
        print(f"\n## {title}\n", flush=True)
        run()


if __name__ == "__main__":
    main()
