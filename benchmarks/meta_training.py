"""Meta-training speed: MAML outer iterations per second, second and first order, on this machine.

    python -m benchmarks.meta_training [--device auto|cpu|cuda] [--size tiny|base] [--steps N]

Times `Maml.step` on the demo's episode shape (4-way, 5 labelled pixels per
class, 2 query tiles of 32 px, 13 bands, meta-batch 4, 3 inner steps) with episodes drawn
beforehand, so only the meta-step is measured. Prints a Markdown row per setting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch

from geo.sample_data import write_sen12ms
from models.backbones import arch_preset, build_model
from models.device import pick_device
from models.learner import LearnerSettings
from models.maml import Fomaml, Maml
from pipeline.ingest import ingest
from pipeline.protocol import EpisodeShape, load_split_index
from pipeline.regions import build_regions


def episodes(work: Path, count: int) -> list:
    root = write_sen12ms(work / "sen12ms", seed=0, regions=4)
    index = ingest("sen12ms", root, work / "index.parquet", progress=False).out
    build_regions(index, index, seed=0)
    return load_split_index(index).episodes("train", "segmentation", EpisodeShape(k_shot=5), count, seed=0)


def iterations_per_second(
    batches: list[list], device: torch.device, size: Literal["tiny", "base"], first_order: bool, in_channels: int
) -> float:
    model = build_model(arch_preset(size, "segmentation", in_channels, 10), seed=0).to(device)
    learner = (Fomaml if first_order else Maml)(model, LearnerSettings(inner_steps=3, inner_lr=0.1))
    learner.step(batches[0], 0)  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches[1:]:
        learner.step(batch, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (len(batches) - 1) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="tiny", choices=("tiny", "base"))
    parser.add_argument("--steps", type=int, default=20, help="timed meta-steps")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as work:
        drawn = episodes(Path(work), 4 * (args.steps + 1))
    batches = [drawn[i : i + 4] for i in range(0, len(drawn), 4)]
    channels = drawn[0].support_images.shape[1]
    print("| device | model | order | meta-batch | iterations/s |")
    print("|---|---|---|---|---|")
    for first_order in (False, True):
        rate = iterations_per_second(batches, device, args.size, first_order, channels)
        order = "first" if first_order else "second"
        print(f"| {device.type} ({torch.get_num_threads()} threads) | {args.size} U-Net | {order} | 4 | {rate:.2f} |")


if __name__ == "__main__":
    main()
