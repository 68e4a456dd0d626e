"""The YAML file that drives the end-to-end run (`landcover run --config FLOW.yaml`).

Every key has a default, so an empty file (or none at all) runs the whole pipeline on generated
SEN12MS-style sample data. Relative paths are read relative to the YAML file. A mistake stops the
run before any step starts, with a `DataError` naming the file and the key:

    output: landcover-output        # every step writes below this folder
    task: segmentation              # or classification
    device: auto                    # or cpu, cuda, cuda:1, mps
    seeds: [0]                      # one training run per method and seed
    data:
      source: sen12ms               # sen12ms | deepglobe | folder
      root: null                    # null: generate sample data of this source's layout
      sample: {seed: 0, regions: 6, size: 32}
      strict: false                 # true: a bad file stops ingest instead of being skipped
      grid: 4                       # DeepGlobe: cut each image into grid x grid tiles
      files_per_task: 32            # ingest reads this many files per task (the unit Dask spreads)
    regions: {by: metadata, column: null, k: null, split: [0.6, 0.2, 0.2], seed: 0}
    methods:                        # run name -> method and its training settings
      maml: {method: maml, iterations: 300}
      pretrain: {method: pretrain, iterations: 300}
    evaluation: {shots: [0, 1, 2, 5, 10], episodes: 50}
    adapt:                          # null: no adaptation step
      method: null                  # the trained run that adapts; null: the first method
      image: null                   # null: generate a sample scene with labels
      labels: null
      scenes: []                    # more scenes to map with the adapted model
      map: {class_column: class}    # pipeline.adapt.MapConfig: steps, lr, window, overlap, pick, check, folds, spacing, pixel
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from geo.errors import DataError

if TYPE_CHECKING:  # torch comes with them: imported when a config is checked, not on import
    from pipeline.adapt import MapConfig
    from pipeline.evaluate import EvaluateConfig
    from pipeline.train import TrainConfig

Source = Literal["sen12ms", "deepglobe", "folder"]
SAMPLE_KIND: dict[str, str] = {"sen12ms": "sen12ms", "deepglobe": "deepglobe", "folder": "eurosat"}
"""The sample-data generator's layout for each ingest source."""


@dataclass(frozen=True)
class SampleConfig:
    seed: int = 0
    regions: int = 6
    size: int = 32


@dataclass(frozen=True)
class DataConfig:
    source: Source = "sen12ms"
    root: Path | None = None
    sample: SampleConfig = field(default_factory=SampleConfig)
    strict: bool = False
    grid: int = 4
    files_per_task: int = 32

    def __post_init__(self) -> None:
        if self.grid < 1 or self.files_per_task < 1:
            raise ValueError("grid and files_per_task must be at least 1")


@dataclass(frozen=True)
class RegionsConfig:
    by: Literal["metadata", "kmeans"] = "metadata"
    column: str | None = None
    k: int | None = None
    split: tuple[float, float, float] | dict[str, tuple[str, ...]] = (0.6, 0.2, 0.2)
    seed: int = 0


@dataclass(frozen=True)
class MethodConfig:
    """One trained model per seed; `settings` go to `pipeline.train.TrainConfig` unchanged."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shared = sorted(set(self.settings) & {"task", "seed", "device"})
        if shared:
            raise ValueError(f"{shared[0]!r} is set for all methods at the top of the file")


@dataclass(frozen=True)
class EvaluationConfig:
    shots: tuple[int, ...] = (0, 1, 2, 5, 10)
    episodes: int = 50


@dataclass(frozen=True)
class AdaptConfig:
    method: str | None = None
    """The trained run that adapts; None: the first of `methods`."""
    image: Path | None = None
    labels: Path | None = None
    scenes: tuple[Path, ...] = ()
    map: dict[str, Any] = field(default_factory=dict)
    """`pipeline.adapt.MapConfig` settings: class_column, steps, lr, window, overlap, ..."""

    def __post_init__(self) -> None:
        stems = [scene.stem for scene in self.scenes]
        if len(set(stems)) != len(stems):
            raise ValueError("adapt.scenes: two scenes share a file name, so their maps would too")


def _default_methods() -> tuple[MethodConfig, ...]:
    return (MethodConfig("maml", "maml"), MethodConfig("pretrain", "pretrain"))


@dataclass(frozen=True)
class FlowConfig:
    output: Path = Path("landcover-output")
    task: Literal["classification", "segmentation"] = "segmentation"
    device: str = "auto"
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = field(default_factory=DataConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    methods: tuple[MethodConfig, ...] = field(default_factory=_default_methods)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    adapt: AdaptConfig | None = field(default_factory=AdaptConfig)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds: name at least one seed")
        names = [method.name for method in self.methods]
        if self.adapt is not None and not names:
            raise ValueError("adapt needs a trained model: name methods, or set adapt: null")
        if self.adapt is not None and self.adapt.method not in (None, *names):
            raise ValueError(f"adapt.method {self.adapt.method!r} is none of methods {names}")
        if self.adapt is not None and self.task != "segmentation":
            raise ValueError("adapt maps a scene, which needs task: segmentation (or adapt: null)")
        if self.adapt is not None and (self.adapt.image is None) != (self.adapt.labels is None):
            raise ValueError("adapt.image and adapt.labels go together (both null: sample scene)")
        if self.regions.by == "kmeans" and self.regions.k is not None and self.regions.k < 2:
            raise ValueError("regions.k must be at least 2")

    @property
    def layout(self) -> Layout:
        return Layout(self.output)

    def run_name(self, method: MethodConfig, seed: int) -> str:
        return f"{method.name}-seed{seed}"

    @property
    def adapt_run(self) -> str:
        """The trained run that adapts to the new region: the named method's first seed."""
        assert self.adapt is not None
        name = self.adapt.method or self.methods[0].name
        return self.run_name(next(m for m in self.methods if m.name == name), self.seeds[0])


@dataclass(frozen=True)
class Layout:
    """Where each step of a run writes, below the config's `output` folder."""

    output: Path

    @property
    def sample_data(self) -> Path:
        return self.output / "sample-data"

    @property
    def index(self) -> Path:
        return self.output / "index.parquet"

    @property
    def regions(self) -> Path:
        """A file of its own: rewriting the ingest index would make ingest look changed."""
        return self.output / "regions.parquet"

    @property
    def runs(self) -> Path:
        return self.output / "runs"

    @property
    def evaluation(self) -> Path:
        return self.output / "evaluation"

    @property
    def sample_scene(self) -> Path:
        return self.output / "sample-scene"

    @property
    def adapted_map(self) -> Path:
        """The map of the scene the model adapted to."""
        return self.output / "adapt" / "map.tif"

    @property
    def adapted_model(self) -> Path:
        return self.output / "adapt" / "model"

    def prediction(self, scene: Path) -> Path:
        """The map of one of `adapt.scenes` (their file names are unique)."""
        return self.output / "maps" / f"{scene.stem}.tif"


def train_config(settings: Mapping[str, Any], where: str = "") -> TrainConfig:
    """`pipeline.train.TrainConfig` from plain settings (nested mappings become dataclasses)."""
    from pipeline.train import TrainConfig

    return _build(TrainConfig, settings, where, Path())


def evaluate_config(settings: Mapping[str, Any], where: str = "") -> EvaluateConfig:
    """`pipeline.evaluate.EvaluateConfig` from plain settings."""
    from pipeline.evaluate import EvaluateConfig

    return _build(EvaluateConfig, settings, where, Path())


def regions_settings(config: FlowConfig) -> dict[str, Any]:
    """Keyword arguments of `pipeline.regions.build_regions`."""
    return dataclasses.asdict(config.regions)


def train_settings(config: FlowConfig, method: MethodConfig, seed: int) -> dict[str, Any]:
    """Keyword arguments of `pipeline.train.TrainConfig` for one method and seed."""
    return {
        "method": method.method,
        "task": config.task,
        "seed": seed,
        "device": config.device,
        **method.settings,
    }


def evaluate_settings(config: FlowConfig) -> dict[str, Any]:
    """Keyword arguments of `pipeline.evaluate.EvaluateConfig`: one protocol for every method."""
    return {
        "shots": config.evaluation.shots,
        "episodes": config.evaluation.episodes,
        "seed": config.seeds[0],
        "device": config.device,
    }


def adapt_settings(config: FlowConfig) -> dict[str, Any]:
    """Keyword arguments of `pipeline.adapt.MapConfig`, for adapting and for mapping scenes."""
    assert config.adapt is not None
    return {"device": config.device, "seed": config.seeds[0], **config.adapt.map}


def map_config(settings: Mapping[str, Any], where: str = "") -> MapConfig:
    """`pipeline.adapt.MapConfig` from plain settings."""
    from pipeline.adapt import MapConfig

    return _build(MapConfig, settings, where, Path())


def load_config(path: Path | None) -> FlowConfig:
    """Read and check a flow config; `None` gives the defaults (sample data, all steps)."""
    if path is None:
        return FlowConfig()
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise DataError(path, f"cannot read the flow config: {error}") from None
    except UnicodeDecodeError:
        raise DataError(path, "is not a text file; a flow config is YAML") from None
    try:
        if not isinstance(document, Mapping):
            raise ValueError("the file must hold a mapping of keys (output, data, methods, ...)")
        document = {**document, "methods": _methods(document.get("methods", _UNSET))}
        config = _build(FlowConfig, document, "", Path(path).resolve().parent)
        for method in config.methods:  # the training settings are checked now, not hours later
            train_config(train_settings(config, method, config.seeds[0]), f"methods.{method.name}")
        if config.methods:
            evaluate_config(evaluate_settings(config), "evaluation")
        if config.adapt is not None:
            map_config(adapt_settings(config), "adapt.map")
        _check_inputs(config)
        return config
    except (TypeError, ValueError) as error:
        raise DataError(path, str(error)) from None


def _check_inputs(config: FlowConfig) -> None:
    """The data and scenes the file names must exist now, before any flow (or Prefect) starts."""
    given = {"data.root": (config.data.root, "folder")}
    if config.adapt is not None:
        given.update({
            "adapt.image": (config.adapt.image, "file"), "adapt.labels": (config.adapt.labels, "file"),
            **{f"adapt.scenes[{i}]": (scene, "file") for i, scene in enumerate(config.adapt.scenes)},
        })
    for key, (path, kind) in given.items():
        if path is None:
            continue
        if not path.exists():
            raise ValueError(f"{key}: {path} does not exist")
        if (kind == "folder") != path.is_dir():
            raise ValueError(f"{key}: {path} is not a {kind}")


_UNSET = object()


def _methods(entries: Any) -> Any:
    """`name: {method: m, **settings}` (method defaults to the name) as MethodConfig fields."""
    if entries is _UNSET:
        return [dataclasses.asdict(method) for method in _default_methods()]
    if not isinstance(entries, Mapping):
        raise ValueError("methods: expected a mapping of run name -> {method: ..., settings}")
    methods = []
    for name, settings in entries.items():
        if not isinstance(settings or {}, Mapping):
            raise ValueError(f"methods.{name}: expected a mapping of settings, got {settings!r}")
        settings = dict(settings or {})
        method = settings.pop("method", name)
        methods.append({"name": str(name), "method": method, "settings": settings})
    return methods


def _build(kind: Any, value: Any, where: str, base: Path) -> Any:
    """`value` converted to the annotated type `kind`; ValueError says which key is wrong."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where or 'file'}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(kind)
        known = [item.name for item in dataclasses.fields(kind)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(
                f"{where or 'file'}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}"
            )
        built = {
            key: _build(hints[key], item, f"{where}.{key}".lstrip("."), base)
            for key, item in value.items()
        }
        try:
            return kind(**built)
        except ValueError as error:
            raise ValueError(f"{where or 'file'}: {error}") from None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _build(option, value, where, base)
            except ValueError as error:
                problems.append(str(error))
        raise ValueError(" or ".join(problems))
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"{where}: expected {len(items)} items, got {len(value)}")
        return tuple(
            _build(item, part, f"{where}[{i}]", base)
            for i, (item, part) in enumerate(zip(items, value))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {
            str(key): _build(args[1], item, f"{where}.{key}", base) for key, item in value.items()
        }
    if kind is Any:
        return value
    if kind is Path:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a path, got {value!r}")
        return base / Path(value).expanduser()
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value
