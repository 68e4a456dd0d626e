"""A run directory: what a trained model is, and how its training resumes after a kill.

    weights.pt      {"model": state dict, "inner_lrs": {parameter name: rate tensor} or {}}
    config.json     RunConfig: method, task, architecture, classes, bands, normalisation,
                    inner loop, fine-tuning budget picked on validation, seed, iterations done
    train_state.pt  module and optimiser state, iteration, RNG states (torch, CUDA, numpy, python)

Every file is written to a temporary file in the same folder and renamed into place, so a kill
leaves the previous complete file, never a torn one. All .pt files load with
`torch.load(weights_only=True)`: they hold tensors, numbers, strings and containers only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from geo.atomic import atomic_output
from geo.errors import DataError
from models.backbones import ArchConfig, build_model

WEIGHTS, CONFIG, TRAIN_STATE = "weights.pt", "config.json", "train_state.pt"


@dataclass(frozen=True)
class RunConfig:
    """What a trained model is and how to use it; config.json of a run directory.

    `finetune_lr` None with `inner_lrs` in weights.pt: fine-tune at the learned inner rates.
    `normalisation` says how raw pixels were scaled (e.g. {"clip": [0, 10000], "divide": 10000}).
    """

    method: str
    task: str
    arch: ArchConfig
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    bands: tuple[str, ...]
    normalisation: dict[str, Any]
    seed: int
    iterations: int = 0
    inner_steps: int | None = None
    inner_lr: float | None = None
    learn_inner_lr: bool = False
    first_order: bool = False
    finetune_steps: int | None = None
    finetune_lr: float | None = None
    validation_accuracy: float | None = None
    """Mean validation accuracy of these weights (early stopping keeps the best)."""
    head_penalty: float | None = None
    head_scale: float | None = None
    """Ridge penalty and logit scale of the closed-form head a run was meta-trained through
    (R2-D2); None for runs without one, whose closed-form variant is a logistic head."""
    seconds_per_iteration: float | None = None
    """Mean wall time of one training iteration, for the cost column of reports."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The training settings as given, for the record."""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "arch": self.arch.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        values = dict(values)
        return cls(
            **{
                **values,
                "arch": ArchConfig.from_dict(values["arch"]),
                "class_names": tuple(values["class_names"]),
                "class_colors": tuple(tuple(color) for color in values["class_colors"]),
                "bands": tuple(values["bands"]),
            }
        )


@dataclass(frozen=True)
class LoadedRun:
    model: nn.Module
    config: RunConfig
    inner_lrs: dict[str, float | Tensor]
    """Learned inner rates as saved: a float per tensor, or a tensor per element (Meta-SGD) or per
    step (MAML++); empty for methods without them."""


def save_run(
    run_dir: Path,
    model: nn.Module,
    config: RunConfig,
    inner_lrs: Mapping[str, Tensor | float] | None = None,
) -> None:
    """Write weights.pt, then config.json (so a config never describes weights not yet written)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rates = {name: torch.as_tensor(rate).detach().to("cpu", torch.float64) for name, rate in (inner_lrs or {}).items()}
    weights = {"model": _cpu(model.state_dict()), "inner_lrs": rates}
    _atomic_write(run_dir / WEIGHTS, lambda f: torch.save(weights, f))
    text = json.dumps(config.to_dict(), indent=2)
    _atomic_write(run_dir / CONFIG, lambda f: f.write(text.encode()))


def load_config(run_dir: Path) -> RunConfig:
    """config.json of a run; DataError naming it when it is missing or not a run's."""
    path = Path(run_dir) / CONFIG
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise DataError(run_dir, f"is not a run directory (no {CONFIG})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot be read ({error})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(path, f"is not a landcover run config ({type(error).__name__}: {error})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A .pt file of ours, loaded with `weights_only=True` only: a file that would need any other
    unpickling (someone else's pickle, or a hostile one) is refused, never loaded another way."""
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning is not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(path, "no such checkpoint file") from None
    except pickle.UnpicklingError as error:
        if str(error).startswith("Weights only load failed"):
            raise DataError(path, "not a landcover checkpoint (refused to unpickle)") from None
        raise DataError(path, f"cannot be read as a checkpoint, truncated or corrupt? ({error})") from None
    except Exception as error:  # torch raises unrelated types for a garbled file
        raise DataError(path, f"cannot be read as a checkpoint, truncated or corrupt? ({_first_line(error)})") from None
    if not isinstance(loaded, dict):
        raise DataError(path, f"not a landcover checkpoint (holds a {type(loaded).__name__})")
    return loaded


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> LoadedRun:
    """The model of a run directory, in eval mode on `device`, with its config and inner rates."""
    if not (Path(run_dir) / WEIGHTS).is_file() or not (Path(run_dir) / CONFIG).is_file():
        raise DataError(run_dir, f"is not a run directory (no {CONFIG} and {WEIGHTS})")
    config = load_config(run_dir)
    path = Path(run_dir) / WEIGHTS
    weights = load_checkpoint(path)
    try:
        model = build_model(config.arch)
        model.load_state_dict(weights["model"])
        rates = {name: float(rate) if rate.ndim == 0 else rate.float() for name, rate in weights["inner_lrs"].items()}
    except (KeyError, RuntimeError, AttributeError, TypeError, ValueError) as error:
        raise DataError(path, f"does not hold the weights its {CONFIG} describes ({_first_line(error)})") from None
    return LoadedRun(model.to(device).eval(), config, rates)


def _first_line(error: Exception) -> str:
    """torch's state-dict errors list every tensor; the first line says what is wrong."""
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def save_train_state(run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, iteration: int) -> None:
    """Everything needed to continue training after `iteration` steps as if never stopped.

    `module` is what is trained: the learner (model + what it learns beside it).
    """
    state = {
        "module": _cpu(module.state_dict()),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "rng": _rng_state(),
    }
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(run_dir) / TRAIN_STATE, lambda f: torch.save(state, f))


def load_train_state(run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore module, optimiser and RNG states; the iteration to continue from (0: fresh start)."""
    path = Path(run_dir) / TRAIN_STATE
    if not path.exists():
        return 0
    state = load_checkpoint(path)
    try:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        return int(state["iteration"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise DataError(path, f"is not this run's training state ({_first_line(error)})") from None


def _cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain tuples (numpy's key array as a tensor: weights_only)."""
    # legacy=True is the default; said explicitly because numpy's stubs type the bare call as the dict form.
    state = np.random.get_state(legacy=True)
    if not isinstance(state, tuple):  # legacy=True gives the tuple unless the global generator is not MT19937
        raise TypeError(f"numpy's global RNG is not MT19937: {state['bit_generator']}")
    kind, keys, position, has_gauss, cached = state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write` into a temporary file beside `path`, flushed to disk, then renamed onto it
    (`geo.atomic.atomic_output`): a kill or a full disk leaves the previous file, so training
    resumes from it once there is space again."""
    with atomic_output(path) as temporary, open(temporary, "xb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
