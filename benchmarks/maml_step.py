"""MAML meta-step against `higher`: the project's second- and first-order step beside the library
users reach for, on the same tiny U-Net, episodes, loss, inner rates and steps.

    python -m benchmarks.maml_step [--device auto|cpu|cuda] [--repeats N] [--batches N] [--threads N]

`higher` is not a dependency of the project; install it for this benchmark only:

    .venv/bin/pip install higher==0.2.1

(it imports and runs unchanged under torch 2.14). Without it the project's step is timed alone.
Episodes are drawn by the project's sampler from generated SEN12MS-layout data: 64 px tiles,
13 bands, 5-way, 5 labelled pixels per class (a sparse support of 1-3 tiles), 2 densely labelled
query tiles; meta-batches of 4 tasks, 3 inner SGD steps. Both sides start from the same
`build_model(arch_preset("tiny", ...), seed=0)` weights and take the same outer step (the mean
query loss of the meta-batch, gradient-norm clipping, Adam), with the learner's inner rates:

- second order: learned per-tensor rates (the project's MAML; `higher` gets them through
  `override`, one SGD parameter group per tensor, so they are learned on both sides);
- first order: fixed rates (`learn_inner_lr=False`); `higher` with `track_higher_grads=False`,
  the query gradient at the adapted weights added onto the initial ones (FOMAML).

First one step of each from the same weights, in float64 on the CPU: the losses and the largest
difference of the outer gradients are printed (they agree to rounding). Then the implementations
run in turn on the same meta-batches, after warm-up, `--repeats` rounds; the table gives each
one's median ms/step and its speed-up over `higher` (the median over rounds of `higher`'s time
over its own in the same round, so that load on the machine cancels). On CUDA the steps run
under bf16 autocast as training does (`models.device.autocast`) and the table adds each one's
peak GPU memory. "landcover" is the step as training runs it (`MetaLearner.task_batching`
"auto": tasks side by side on CUDA, one after the other on a CPU); the other way is timed beside it.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geo.sample_data import write_sen12ms
from models.backbones import arch_preset, build_model, episode_loss
from models.device import autocast, pick_device
from models.learner import EpisodeLike, LearnerSettings, task_tensors
from models.maml import Fomaml, Maml, MetaLearner
from pipeline.ingest import ingest
from pipeline.protocol import EpisodeShape, load_split_index
from pipeline.regions import build_regions

TASKS = 4
INNER_STEPS = 3
INNER_LR = 0.01
SIZE = 64
SHAPE = EpisodeShape(n_way=5, k_shot=5, query_tiles=2)

Step = Callable[[Sequence[EpisodeLike]], float]


def load_higher() -> Any | None:
    """The `higher` module, or None when it is not installed."""
    try:
        return importlib.import_module("higher")
    except ImportError:
        return None


def draw_batches(count: int) -> list[list[Any]]:
    """`count` meta-batches of `TASKS` sparse segmentation episodes from generated data."""
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        root = write_sen12ms(work / "sen12ms", seed=0, regions=4, size=SIZE, patches_per_region=32)
        index = ingest("sen12ms", root, work / "index.parquet", progress=False).out
        build_regions(index, index, seed=0)
        drawn = load_split_index(index).episodes("train", "segmentation", SHAPE, TASKS * count, seed=0)
    return [drawn[i : i + TASKS] for i in range(0, len(drawn), TASKS)]


def learner(device: torch.device, first_order: bool, bands: int, batching: str = "auto") -> MetaLearner:
    """The project's MAML (FOMAML) learner on the tiny U-Net, the same weights every time."""
    model = build_model(arch_preset("tiny", "segmentation", bands, 10), seed=0).to(device)
    settings = LearnerSettings(inner_steps=INNER_STEPS, inner_lr=INNER_LR, learn_inner_lr=not first_order)
    made = (Fomaml if first_order else Maml)(model, settings)
    made.task_batching = batching  # type: ignore[assignment]
    return made


def higher_step(higher: Any, meta: MetaLearner, batch: Sequence[EpisodeLike], first_order: bool) -> float:
    """One outer step of `meta` (its model, inner rates, optimiser and settings) written with
    `higher` as its README writes MAML: a differentiable SGD inner loop per task, then the query
    loss backward (first order: its gradient at the adapted weights)."""
    model = meta.model
    model.train()
    meta.optimizer.zero_grad(set_to_none=True)
    weights = list(model.parameters())
    inner = torch.optim.SGD([{"params": [weight]} for weight in weights], lr=meta.settings.inner_lr)
    total = 0.0
    for episode in batch:
        task = task_tensors(model, episode)
        with autocast(weights[0].device):
            rates = [log_lr.exp() for log_lr in meta.log_lrs]  # the learner's own, on both sides
            override = {"lr": [rate.detach() for rate in rates] if first_order else rates}
            with higher.innerloop_ctx(
                model, inner, copy_initial_weights=False, track_higher_grads=not first_order, override=override
            ) as (fmodel, diffopt):
                for _ in range(meta.settings.inner_steps):
                    diffopt.step(episode_loss(fmodel(task.support_x), task.support_y, task.classes))
                loss = episode_loss(fmodel(task.query_x), task.query_y, task.classes) / len(batch)
                if first_order:  # FOMAML: the query gradient at the adapted weights, onto the initial ones
                    for weight, grad in zip(weights, torch.autograd.grad(loss, list(fmodel.parameters()))):
                        weight.grad = grad if weight.grad is None else weight.grad + grad
                else:
                    loss.backward()
        total += loss.item()
    meta.clip_and_step()
    return total


def stepper(meta: MetaLearner) -> Step:
    return lambda batch: meta.step(batch, 0)


def higher_stepper(higher: Any, meta: MetaLearner, first_order: bool) -> Step:
    return lambda batch: higher_step(higher, meta, batch, first_order)


def gradients(meta: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in meta.parameters()]


def relative_difference(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> float:
    """The largest difference of two lists of tensors, relative to each tensor's largest entry."""
    worst = 0.0
    for a, b in zip(first, second):
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a.double() - b.double()).abs().max()) / scale)
    return worst


def same_step(higher: Any, batch: Sequence[EpisodeLike], first_order: bool, bands: int) -> str:
    """One step of each implementation from the same weights, in float64 on the CPU (in float32
    a second-order meta-gradient differs by rounding alone in its smallest entries)."""
    cpu = torch.device("cpu")
    found = {}
    for name, batching in (("landcover", "loop"), ("landcover (vmap)", "vmap"), ("higher", "loop")):
        meta = learner(cpu, first_order, bands, batching).double()
        loss = higher_step(higher, meta, batch, first_order) if name == "higher" else meta.step(batch, 0)
        found[name] = (loss, gradients(meta))
    theirs = found.pop("higher")
    parts = [
        f"{name} loss {loss:.9f}, outer gradients within {relative_difference(grads, theirs[1]):.0e} of higher's"
        for name, (loss, grads) in found.items()
    ]
    return ", ".join(parts) + f" (higher: loss {theirs[0]:.9f}; float64, one step from the same weights)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: dict[str, Step], batches: list[list[Any]], device: torch.device, repeats: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per step of each implementation, in turn on the same batches (after a warm-up
    round of two steps each), and each one's peak GPU memory in bytes (CUDA only)."""
    for step in steps.values():
        for batch in batches[:2]:
            step(batch)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, int] = dict.fromkeys(steps, 0)
    for round_ in range(repeats):
        batch = batches[round_ % len(batches)]
        for name, step in steps.items():
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            step(batch)
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
    return seconds, peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each implementation once a round)")
    parser.add_argument("--batches", type=int, default=5, help="distinct meta-batches, cycled")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    higher = load_higher()
    batches = draw_batches(args.batches)
    bands = batches[0][0].support_images.shape[1]
    where = f"{device.type} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, bf16 autocast"
    print(
        f"MAML meta-step on {where}: tiny U-Net, {TASKS} tasks of {SHAPE.n_way}-way {SHAPE.k_shot}-shot "
        f"sparse {SIZE} px episodes, {INNER_STEPS} inner steps, torch {torch.__version__}"
    )
    if higher is None:
        print("`higher` is not installed (`.venv/bin/pip install higher==0.2.1`): the project's step alone.")

    other = "loop" if learner(device, False, bands).batches_tasks() else "vmap"
    rows = []
    for first_order in (False, True):
        order = "first" if first_order else "second"
        steps = {
            "landcover": stepper(learner(device, first_order, bands)),
            f"landcover ({other})": stepper(learner(device, first_order, bands, other)),
        }
        if higher is not None:
            print(f"{order} order: {same_step(higher, batches[0], first_order, bands)}", flush=True)
            steps["higher"] = higher_stepper(higher, learner(device, first_order, bands), first_order)
        seconds, peaks = time_steps(steps, batches, device, args.repeats)
        for name, times in seconds.items():
            ratio = ""
            if "higher" in seconds:
                ratio = f"{statistics.median(h / t for h, t in zip(seconds['higher'], times)):.2f}x"
            memory = f" {peaks[name] / 2**20:.0f} MiB |" if device.type == "cuda" else ""
            rows.append(f"| {order} | {name} | {1000 * statistics.median(times):.0f} | {ratio} |{memory}")
    memory_head = (" peak GPU memory |", "---|") if device.type == "cuda" else ("", "")
    print()
    print(f"| order | implementation | ms/step (median of {args.repeats}) | speed-up over higher |{memory_head[0]}")
    print(f"|---|---|---|---|{memory_head[1]}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
