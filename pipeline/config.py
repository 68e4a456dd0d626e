"""The YAML file that drives the end-to-end run (`landcover run --config FLOW.yaml`).

Every key has a default, so an empty file (or none at all) runs the whole pipeline on generated
SEN12MS-style sample data. Relative paths are read relative to the YAML file. The file is checked
by the pydantic models below (unknown keys refused, types and ranges checked) and each method's
settings by the step's own config (`pipeline.train.TrainConfig`, ...). A mistake stops the run
before any step starts, with a `DataError` naming the file and the key:

    output: landcover-output        # every step writes below this folder
    task: segmentation              # or classification
    device: auto                    # or cpu, cuda, cuda:1
    seeds: [0]                      # one training run per method and seed
    data:
      source: sen12ms               # sen12ms | dfc2020 | deepglobe | folder | pairs (geo/sources)
      root: null                    # null: generate sample data of this source's layout
      classes: null                 # pairs: its classes file (label values, names, colours)
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
      map: {class_column: class}    # pipeline.adapt.MapConfig: steps, lr, window, pick, check, folds, ...
      probabilities: false          # true: MAP.probabilities.tif beside every map (a band per class)
      confidence: false             # true: MAP.confidence.tif beside every map (+ its QGIS ramp style)
      vector: false                 # true: MAP.gpkg beside every map (the classes as polygons)
      suggest: null                 # N: adapt/suggestions.gpkg, N points to label next on the adapted scene
      suggest_spacing: 32           # pixels between suggestions, and from any label
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from geo.errors import DataError
from geo.sources import SOURCE_NAMES, source_class
from geo.validation import problems

if TYPE_CHECKING:  # torch comes with them: imported when a config is checked, not on import
    from pipeline.adapt import MapConfig
    from pipeline.evaluate import EvaluateConfig
    from pipeline.train import TrainConfig

_SHARED_KEYS = ("task", "seed", "device")
"""Training settings set once at the top of the file, for every method."""


def _from_file(path: Path, info: ValidationInfo) -> Path:
    """A relative path is read relative to the YAML file (its folder is the context's "base")."""
    return (info.context or {}).get("base", Path()) / path.expanduser()


def _device(name: str) -> str:
    """The names `models.device.pick_device` takes; whether a GPU is there is the step's check."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"{name!r} is not one of auto, cpu, cuda, cuda:N")
    return name


def _own_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A method's settings leave out what the top of the file sets for every method."""
    shared = [key for key in _SHARED_KEYS if key in settings]
    if shared:
        raise ValueError(f"{shared[0]!r} is set for all methods at the top of the file")
    return settings


ConfigPath = Annotated[Path, AfterValidator(_from_file)]
MethodSettings = Annotated[
    dict[str, Any], BeforeValidator(lambda value: {} if value is None else value), AfterValidator(_own_settings)
]
"""`method` (default: the run name) and `pipeline.train.TrainConfig` settings, checked by it."""
Split = Annotated[
    Annotated[tuple[float, ...], Field(min_length=3, max_length=3), Tag("fractions")]
    | Annotated[dict[Literal["train", "val", "test"], tuple[str, ...]], Tag("lists")],
    Discriminator(lambda value: "lists" if isinstance(value, Mapping) else "fractions"),
]
"""Fractions of regions for train, val, test, or their lists of regions."""
_NOT_KEYS = ("fractions", "lists", "[key]")
"""What pydantic puts in an error's location besides keys: the union member (`Split`'s tags), a mapping's key."""


class _Checked(BaseModel):
    """A part of the file: unknown keys are refused (a typo never silently keeps a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleConfig(_Checked):
    seed: int = Field(0, ge=0)
    regions: int = Field(6, ge=1)
    size: int = Field(32, ge=16)


class DataConfig(_Checked):
    source: str = "sen12ms"
    root: ConfigPath | None = None
    classes: ConfigPath | None = None
    """The classes file of a source that takes one (pairs)."""
    sample: SampleConfig = SampleConfig()
    strict: bool = False
    grid: int = Field(4, ge=1)
    files_per_task: int = Field(32, ge=1)

    @field_validator("source")
    @classmethod
    def _registered(cls, source: str) -> str:
        if source not in SOURCE_NAMES:
            raise ValueError(f"{source!r} is not one of {', '.join(SOURCE_NAMES)}")
        return source

    @model_validator(mode="after")
    def _complete(self) -> DataConfig:
        """A source that takes a classes file (pairs) names one, others none; without a root, sample data of the
        source's layout is generated, which only some sources have."""
        takes_classes = source_class(self.source).takes_classes
        if takes_classes != (self.classes is not None):
            raise ValueError(
                f"the {self.source} source needs classes: (its classes file)"
                if takes_classes
                else f"classes: does not apply to the {self.source} source (its classes are fixed)"
            )
        if self.root is None:
            self.sample_kind  # noqa: B018 (raises when the source has no sample data)
        return self

    @property
    def sample_kind(self) -> str:
        """The `landcover sample-data --kind` that writes this source's layout (when `root` is null)."""
        kind = source_class(self.source).sample_kind
        if kind is None:
            raise ValueError(f"the {self.source} source has no sample data: give root: (the dataset's folder)")
        return kind


class RegionsConfig(_Checked):
    by: Literal["metadata", "kmeans"] = "metadata"
    column: str | None = None
    k: Annotated[int, Field(ge=2)] | None = None
    split: Split = (0.6, 0.2, 0.2)
    seed: int = 0


@dataclass(frozen=True)
class MethodConfig:
    """One trained model per seed; `settings` go to `pipeline.train.TrainConfig` unchanged."""

    name: str
    method: str
    settings: dict[str, Any]


class EvaluationConfig(_Checked):
    shots: tuple[Annotated[int, Field(ge=0)], ...] = Field((0, 1, 2, 5, 10), min_length=1)
    episodes: int = Field(50, ge=1)


MAP_EXTRAS = ("probabilities", "confidence", "vector")
"""The optional files a map can have beside it, named as `adapt`'s options."""


def beside(map_path: Path, extras: Sequence[str]) -> dict[str, Path]:
    """The optional files (of `MAP_EXTRAS`) written beside a map, by kind: `MAP.probabilities.tif`,
    `MAP.confidence.tif`, `MAP.gpkg`; the `adapt` and `predict_map` arguments of those names."""
    names = {"probabilities": ".probabilities.tif", "confidence": ".confidence.tif", "vector": ".gpkg"}
    return {kind: map_path.with_name(map_path.stem + names[kind]) for kind in extras}


class AdaptConfig(_Checked):
    method: str | None = None
    """The trained run that adapts; None: the first of `methods`."""
    image: ConfigPath | None = None
    labels: ConfigPath | None = None
    scenes: tuple[ConfigPath, ...] = ()
    map: dict[str, Any] = {}
    """`pipeline.adapt.MapConfig` settings: class_column, steps, lr, window, overlap, ..."""
    probabilities: bool = False
    confidence: bool = False
    vector: bool = False
    suggest: Annotated[int, Field(ge=1)] | None = None
    """Points to label next on the adapted scene (`adapt --suggest`); None: no suggestions."""
    suggest_spacing: float = Field(32, ge=0)

    @property
    def extras(self) -> tuple[str, ...]:
        """The kinds of `MAP_EXTRAS` written beside every map."""
        return tuple(kind for kind in MAP_EXTRAS if getattr(self, kind))

    @model_validator(mode="after")
    def _unique_names(self) -> AdaptConfig:
        """Every scene's map, and the files beside it, must have a name of its own."""
        written = [
            name
            for scene in self.scenes
            for name in [
                f"{scene.stem}.tif",
                *(path.name for path in beside(Path(scene.stem + ".tif"), self.extras).values()),
            ]
        ]
        if len(set(written)) != len(written):
            twice = sorted({name for name in written if written.count(name) > 1})
            raise ValueError(f"two of scenes would write the same file, maps/{twice[0]}")
        return self


def _default_methods() -> dict[str, dict[str, Any]]:
    return {"maml": {}, "pretrain": {}}


class FlowConfig(_Checked):
    output: ConfigPath = Path("landcover-output")
    task: Literal["classification", "segmentation"] = "segmentation"
    device: Annotated[str, AfterValidator(_device)] = "auto"
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    data: DataConfig = DataConfig()
    regions: RegionsConfig = RegionsConfig()
    trained: dict[str, MethodSettings] = Field(default_factory=_default_methods, alias="methods")
    """The file's `methods`: run name -> its settings; read them as `methods`."""
    evaluation: EvaluationConfig = EvaluationConfig()
    adapt: AdaptConfig | None = AdaptConfig()

    @model_validator(mode="after")
    def _consistent(self) -> FlowConfig:
        """Rules between keys, which would otherwise fail only when their step runs."""
        if self.adapt is None:
            return self
        names = list(self.trained)
        if not names:
            raise ValueError("adapt needs a trained model: name methods, or set adapt: null")
        if self.adapt.method not in (None, *names):
            raise ValueError(f"adapt.method {self.adapt.method!r} is none of methods {names}")
        if self.task != "segmentation":
            raise ValueError("adapt maps a scene, which needs task: segmentation (or adapt: null)")
        if (self.adapt.image is None) != (self.adapt.labels is None):
            raise ValueError("adapt.image and adapt.labels go together (both null: sample scene)")
        return self

    @property
    def methods(self) -> tuple[MethodConfig, ...]:
        """The trained methods in the file's order; `method` defaults to the run name."""
        return tuple(
            MethodConfig(name, settings.get("method", name), {k: v for k, v in settings.items() if k != "method"})
            for name, settings in self.trained.items()
        )

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

    @property
    def suggestions(self) -> Path:
        """The points to label next on the adapted scene (`adapt.suggest`)."""
        return self.output / "adapt" / "suggestions.gpkg"


def train_config(settings: Mapping[str, Any], where: str = "") -> TrainConfig:
    """`pipeline.train.TrainConfig` from plain settings (nested mappings become dataclasses)."""
    from pipeline.train import TrainConfig

    return _step_config(TrainConfig, settings, where)


def evaluate_config(settings: Mapping[str, Any], where: str = "") -> EvaluateConfig:
    """`pipeline.evaluate.EvaluateConfig` from plain settings."""
    from pipeline.evaluate import EvaluateConfig

    return _step_config(EvaluateConfig, settings, where)


def map_config(settings: Mapping[str, Any], where: str = "") -> MapConfig:
    """`pipeline.adapt.MapConfig` from plain settings."""
    from pipeline.adapt import MapConfig

    return _step_config(MapConfig, settings, where)


def regions_settings(config: FlowConfig) -> dict[str, Any]:
    """Keyword arguments of `pipeline.regions.build_regions`."""
    return config.regions.model_dump()


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


def suggest_settings(config: FlowConfig) -> dict[str, Any] | None:
    """Keyword arguments of `pipeline.adapt.SuggestConfig`, or None when no points are asked for."""
    assert config.adapt is not None
    if config.adapt.suggest is None:
        return None
    return {"count": config.adapt.suggest, "out": config.layout.suggestions, "spacing": config.adapt.suggest_spacing}


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
    if not isinstance(document, Mapping):
        raise DataError(path, "the file must hold a mapping of keys (output, data, methods, ...)")
    try:
        config = FlowConfig.model_validate(document, context={"base": Path(path).resolve().parent})
    except ValidationError as error:
        raise DataError(path, problems(error.errors(), FlowConfig, not_keys=_NOT_KEYS)) from None
    try:
        for method in config.methods:  # the training settings are checked now, not hours later
            train_config(train_settings(config, method, config.seeds[0]), f"methods.{method.name}")
        if config.methods:
            evaluate_config(evaluate_settings(config), "evaluation")
        if config.adapt is not None:
            map_config(adapt_settings(config), "adapt.map")
        _check_inputs(config)
    except ValueError as error:
        raise DataError(path, str(error)) from None
    return config


def _check_inputs(config: FlowConfig) -> None:
    """The data and scenes the file names must exist now, before any flow (or Prefect) starts."""
    given = {"data.root": (config.data.root, "folder"), "data.classes": (config.data.classes, "file")}
    if config.adapt is not None:
        given.update(
            {
                "adapt.image": (config.adapt.image, "file"),
                "adapt.labels": (config.adapt.labels, "file"),
                **{f"adapt.scenes[{i}]": (scene, "file") for i, scene in enumerate(config.adapt.scenes)},
            }
        )
    for key, (path, kind) in given.items():
        if path is None:
            continue
        if not path.exists():
            raise ValueError(f"{key}: {path} does not exist")
        if (kind == "folder") != path.is_dir():
            raise ValueError(f"{key}: {path} is not a {kind}")


Config = TypeVar("Config")


def _step_config(kind: type[Config], settings: Mapping[str, Any], where: str) -> Config:
    """A step's dataclass checked by pydantic (its types, its `__post_init__`); ValueError names the key.

    It is checked inside a list: a dataclass takes the config of what holds it, and this one refuses
    unknown keys (pydantic takes no config for a dataclass itself)."""
    adapter = TypeAdapter(list[kind], config=ConfigDict(extra="forbid"))  # type: ignore[valid-type]
    try:
        return adapter.validate_python([dict(settings)])[0]
    except ValidationError as error:
        details = [{**detail, "loc": detail["loc"][1:]} for detail in error.errors()]  # past the list index
        raise ValueError(problems(details, kind, where, not_keys=_NOT_KEYS)) from None
