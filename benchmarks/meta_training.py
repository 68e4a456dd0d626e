"""Meta-training speed: MAML meta-steps per second, and training on crops against today's whole patches.

    python -m benchmarks.meta_training [--part all|steps|crops] [--device auto|cpu|cuda] [--size tiny [base]]
        [--tile PX] [--steps N] [--seconds S] [--patches N] [--crop PX] [--baseline REF] [--work DIR]

`steps`: times `Maml.step` on the demo's episode shape (4-way, 5 labelled pixels per class, 2 query
tiles of `--tile` px (32), 13 bands, meta-batch 4, 3 inner steps) with episodes drawn beforehand,
so only the meta-step is measured; on CUDA under bf16 autocast, as training runs, with the peak
GPU memory. Prints a Markdown row per model and order.

`crops` (issue 13): SEN12MS-layout patches of 256 px (6 scenes x 2 seasons x `--patches`), CPU,
tiny U-Net. Today's code (`git archive` of `--baseline`, run with this Python in a subprocess)
and this tree's code (`TrainConfig.crop`) each pretrain for `--seconds` of wall-clock time, then
meta-train MAML from those weights for as long, as `landcover train` does: validation on the
code's own validation episodes every 25 iterations keeps the best weights, and a last one when
time is up, its time counted. Both read every tile into memory before the clock starts. Then this
tree's evaluation code scores each best model on the same whole-tile validation episodes (other
than those early stopping saw) at 1 and 5 shots, by its learner's own adaptation (fine-tuning for
its inner steps at its rates, as validation does). One Markdown table: training iterations per
second (steps alone, the speed-up, and with validation), the seconds of one validation pass, and
the accuracies. The default run takes about 10 minutes on 2 cores.

The worker half of this file (`--worker`) runs under either code, so it imports only what both have.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from geo.sample_data import write_sen12ms
from models.backbones import arch_preset, build_model
from models.device import pick_device
from models.learner import LearnerSettings
from models.maml import Fomaml, Maml
from pipeline.ingest import ingest
from pipeline.protocol import EpisodeShape, load_split_index
from pipeline.regions import build_regions

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "708d26462ba0e62e64cab52048dcb36eed468679"
"""Today's code for issue 13: main before training on crops (it trains on whole tiles)."""
PHASES = ("pretrain", "maml")
SHOTS = (1, 5)


# --- meta-step speed ---------------------------------------------------------------------------


def episodes(work: Path, count: int, tile: int = 32) -> list:
    root = write_sen12ms(work / "sen12ms", seed=0, regions=4, size=tile)
    index = ingest("sen12ms", root, work / "index.parquet", progress=False).out
    build_regions(index, index, seed=0)
    return load_split_index(index).episodes("train", "segmentation", EpisodeShape(k_shot=5), count, seed=0)


def iterations_per_second(
    batches: list[list], device: torch.device, size: Literal["tiny", "base"], first_order: bool, in_channels: int
) -> tuple[float, int]:
    """Meta-steps per second after a warm-up step, and the peak GPU memory in bytes (0 on a CPU)."""
    model = build_model(arch_preset(size, "segmentation", in_channels, 10), seed=0).to(device)
    learner = (Fomaml if first_order else Maml)(model, LearnerSettings(inner_steps=3, inner_lr=0.1))
    learner.step(batches[0], 0)  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for batch in batches[1:]:
        learner.step(batch, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return (len(batches) - 1) / (time.perf_counter() - started), peak


def meta_steps(device: torch.device, sizes: Sequence[Literal["tiny", "base"]], steps: int, tile: int) -> None:
    """A row per model and order: meta-steps/s (bf16 autocast on CUDA, as training runs) and peak GPU memory."""
    with tempfile.TemporaryDirectory() as work:
        drawn = episodes(Path(work), 4 * (steps + 1), tile)
    batches = [drawn[i : i + 4] for i in range(0, len(drawn), 4)]
    channels = drawn[0].support_images.shape[1]
    where = f"cpu ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, bf16"
    print("| device | model | tiles | order | meta-batch | iterations/s | peak GPU memory MiB |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        for first_order in (False, True):
            rate, peak = iterations_per_second(batches, device, size, first_order, channels)
            order = "first" if first_order else "second"
            memory = f"{peak / 2**20:.0f}" if device.type == "cuda" else "-"
            print(f"| {where} | {size} U-Net | {tile} px | {order} | 4 | {rate:.2f} | {memory} |", flush=True)


# --- crops against whole patches: the worker (runs under either code) --------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Pretrain, then MAML from its best weights, each for `seconds` of wall-clock time, as
    `landcover train` does; the best weights go to run directories; the timings are returned."""
    from models.checkpoint import RunConfig, save_run
    from models.learners import LEARNERS
    from pipeline import train as training

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    data = load_split_index(Path(spec["index"]))
    settings = {f.name for f in dataclasses.fields(training.TrainConfig)}
    if spec["crop"] is not None and "crop" not in settings:
        raise SystemExit(f"{spec['label']}: this code has no TrainConfig.crop")
    windows = {"crop": spec["crop"]} if "crop" in settings else {}
    mean, std = data.band_statistics("train")
    arch = dataclasses.replace(
        arch_preset("tiny", "segmentation", len(data.bands), len(data.class_names)), input_mean=mean, input_std=std
    )
    for split in ("train", "val"):  # every tile in memory before the clock starts
        labels = data.split(split).index.to_numpy()
        for start in range(0, len(labels), 16):
            data.tiles.images(labels[start : start + 16])
    weights: dict[str, torch.Tensor] | None = None
    results: dict[str, Any] = {}
    for method in PHASES:
        config = training.TrainConfig(
            method=method,
            device="cpu",
            seed=0,
            validate_every=spec["validate_every"],
            validation_episodes=spec["validation_episodes"],
            **windows,
        )
        if hasattr(training, "validation_episodes"):
            validation = training.validation_episodes(data, config)
        else:  # today's code: whole tiles
            validation = data.episodes("val", config.task, config.shape, config.validation_episodes, config.seed + 1)
        model = build_model(arch, seed=config.seed)
        if weights is not None:
            model.load_state_dict(weights)
        trainer = training._Trainer(LEARNERS[method](model, config.learner_settings()), data, config)
        run_config = RunConfig(
            method=method,
            task="segmentation",
            arch=arch,
            class_names=data.class_names,
            class_colors=data.class_colors,
            bands=data.bands,
            normalisation={"clip": [0, 10000], "divide": 10000, "uint8_divide": 255},
            seed=config.seed,
            settings=config.settings(),
        )
        _say(f"{spec['label']}: {method} for {spec['seconds']:.0f} s")
        timing = _train_for(trainer, validation, run_config, spec["seconds"], config.validate_every)
        best = timing.pop("best")
        trainer.model.load_state_dict(best["model"])
        fields = best["fields"]
        final = dataclasses.replace(
            run_config,
            **fields,
            iterations=timing["best_iteration"],
            validation_accuracy=timing["best_score"],
            finetune_steps=fields.get("inner_steps", config.inner_steps),
            finetune_lr=None if best["rates"] else fields.get("inner_lr", config.inner_lr),
        )
        run_dir = Path(spec["out"]) / method
        save_run(run_dir, trainer.model, final, best["rates"])
        weights = {key: value.clone() for key, value in trainer.model.state_dict().items()}
        results[method] = {**timing, "run_dir": str(run_dir)}
    return results


def _train_for(trainer: Any, validation: list, run_config: Any, seconds: float, every: int) -> dict[str, Any]:
    """Training steps until `seconds` have passed, validating every `every` iterations and once
    at the end (as `train` does at its last iteration), keeping the best weights."""
    step_seconds = validation_seconds = 0.0
    validations = iteration = best_iteration = 0
    best_score, best = -1.0, {}
    started = time.perf_counter()
    while True:
        clock = time.perf_counter()
        trainer.step(iteration)
        step_seconds += time.perf_counter() - clock
        iteration += 1
        over = time.perf_counter() - started >= seconds
        if iteration % every == 0 or over:
            clock = time.perf_counter()
            score = trainer.validation_score(validation, run_config)
            validation_seconds += time.perf_counter() - clock
            validations += 1
            if score > best_score:
                best_score, best_iteration = score, iteration
                best = {
                    "model": {key: value.clone() for key, value in trainer.model.state_dict().items()},
                    "rates": {
                        key: value.clone() if isinstance(value, torch.Tensor) else value
                        for key, value in trainer.learner.inner_rates().items()
                    },
                    "fields": dict(trainer.learner.run_fields()),
                }
        if over:
            break
    return {
        "iterations": iteration,
        "step_seconds": step_seconds,
        "validations": validations,
        "validation_seconds": validation_seconds,
        "wall_seconds": time.perf_counter() - started,
        "best_iteration": best_iteration,
        "best_score": best_score,
        "best": best,
    }


# --- crops against whole patches: the comparison ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Code:
    label: str
    root: Path
    crop: int | None


def crops(args: argparse.Namespace) -> None:
    work_root = Path(args.work) if args.work else None
    if work_root is not None:
        work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root) as scratch:
        work = Path(scratch)
        _say(f"writing {6 * 2 * args.patches} SEN12MS-layout patches of 256 px")
        root = write_sen12ms(work / "sen12ms", seed=0, regions=6, size=256, patches_per_region=args.patches)
        index = ingest("sen12ms", root, work / "index.parquet", progress=False).out
        split = build_regions(index, work / "split.parquet", by="metadata", seed=0).index_path
        base = _export(args.baseline, work / "baseline")
        codes = [
            Code(f"today ({args.baseline[:7]}, whole tiles)", base, None),
            Code(f"crop {args.crop}", ROOT, args.crop),
        ]
        timings = {code.label: _run_worker(code, split, work / f"runs-{n}", args) for n, code in enumerate(codes)}
        _say(f"scoring every best model on {args.eval_episodes} whole-tile validation episodes")
        accuracy = _score(split, timings, args.eval_episodes)
    _table(codes, timings, accuracy, args)


def _export(ref: str, out: Path) -> Path:
    """The tracked files of `ref` (a commit of this repository) in `out`, as a git archive."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True, check=True)
    out.mkdir(parents=True)
    tar = out.with_suffix(".tar")
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as handle:
        handle.extractall(out, filter="data")
    return out


def _run_worker(code: Code, index: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = {
        "label": code.label,
        "index": str(index),
        "out": str(out),
        "crop": code.crop,
        "seconds": args.seconds,
        "validate_every": 25,
        "validation_episodes": 8,
        "threads": args.threads,
    }
    env = {**os.environ, "PYTHONPATH": str(code.root)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        cwd=code.root,
        env=env,
        stdout=subprocess.PIPE,
        check=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _score(index: Path, timings: dict[str, dict[str, Any]], count: int) -> dict[tuple[str, str], dict[int, float]]:
    """Mean accuracy of every best model on the same whole-tile validation episodes, by its
    learner's own adaptation, at each of `SHOTS`."""
    from models.checkpoint import load_run
    from pipeline.candidates import run_candidates
    from pipeline.protocol import score_candidate
    from tasks.episodes import fewer_shots

    data = load_split_index(index)
    shape = EpisodeShape(k_shot=max(SHOTS))
    episodes = data.episodes("val", "segmentation", shape, count, seed=1000)  # not those early stopping saw
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for label, phases in timings.items():
        for method in PHASES:
            run = load_run(Path(phases[method]["run_dir"]), torch.device("cpu"))
            own = run_candidates(run, method)[0]
            scores[label, method] = {
                shots: float(
                    np.mean(
                        [
                            score_candidate(own, fewer_shots(episode, shots, seed=number))["accuracy"]
                            for number, episode in enumerate(episodes)
                        ]
                    )
                )
                for shots in SHOTS
            }
    return scores


def _table(
    codes: list[Code],
    timings: dict[str, dict[str, Any]],
    accuracy: dict[tuple[str, str], dict[int, float]],
    args: argparse.Namespace,
) -> None:
    threads = args.threads or torch.get_num_threads()
    print(
        f"SEN12MS-layout 256 px patches ({6 * 2 * args.patches}), tiny U-Net, CPU ({threads} "
        f"threads); each code trains {args.seconds:.0f} s per phase (MAML from its own pretrained weights), "
        "validating every 25 iterations on its own 8 validation episodes; accuracy on the same "
        f"{args.eval_episodes} whole-tile validation episodes (4-way), fine-tuned as each learner validates.\n"
    )
    shots = " | ".join(f"{k}-shot accuracy" for k in SHOTS)
    print(
        f"| phase | code | iterations | iterations/s (steps) | speed-up | iterations/s (with validation) "
        f"| s per validation | {shots} |"
    )
    print("|---|---|---|---|---|---|---|" + "---|" * len(SHOTS))
    for method in PHASES:
        today = timings[codes[0].label][method]
        for code in codes:
            timing = timings[code.label][method]
            rate = timing["iterations"] / timing["step_seconds"]
            speedup = rate / (today["iterations"] / today["step_seconds"])
            per_validation = timing["validation_seconds"] / max(timing["validations"], 1)
            scores = " | ".join(f"{accuracy[code.label, method][k]:.3f}" for k in SHOTS)
            print(
                f"| {method} | {code.label} | {timing['iterations']} | {rate:.3f} | {speedup:.2f}x "
                f"| {timing['iterations'] / timing['wall_seconds']:.3f} | {per_validation:.1f} | {scores} |"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--part", default="all", choices=("all", "steps", "crops"))
    parser.add_argument("--device", default="auto", help="steps: the device")
    parser.add_argument("--size", nargs="+", default=["tiny"], choices=("tiny", "base"), help="steps: the models")
    parser.add_argument("--tile", type=int, default=32, help="steps: tile side in px of the episodes")
    parser.add_argument("--steps", type=int, default=20, help="steps: timed meta-steps")
    parser.add_argument("--seconds", type=float, default=100.0, help="crops: wall-clock seconds per phase and code")
    parser.add_argument("--patches", type=int, default=16, help="crops: patches per (season, scene), 12 of those")
    parser.add_argument("--crop", type=int, default=96, help="crops: TrainConfig.crop of this tree's run")
    parser.add_argument("--eval-episodes", type=int, default=12, help="crops: validation episodes scored")
    parser.add_argument("--baseline", default=BASELINE, help="crops: the commit whose code is today's")
    parser.add_argument("--threads", type=int, default=0, help="crops: torch threads of both runs (0: torch's default)")
    parser.add_argument("--work", default=None, help="crops: folder for the data (default: the system's temp)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.part in ("all", "steps"):
        meta_steps(pick_device(args.device), args.size, args.steps, args.tile)
    if args.part in ("all", "crops"):
        if args.part == "all":
            print()
        crops(args)


if __name__ == "__main__":
    main()
