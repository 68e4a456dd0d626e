"""Every command, given a bad input the way a hostile new user would give it, fails with one line
`error: PATH: problem` (or typer's usage error naming the option) and a non-zero exit, writes
nothing and changes nothing, and never runs code hidden in a pickle.

The cases are data: each builds its bad input in the test's own folder and says which file or
value the message must name and what it must say. Bad adapt/predict inputs about labels and models
have their own table in test_adapt.py; real-world raster cases are in test_real_rasters.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from geo.index import METADATA_KEY
from geo.sample_data import SceneFiles, write_sen12ms
from pipeline.cli import app

runner = CliRunner(env={"COLUMNS": "250"})  # rich wraps a usage error at 80 columns, mid-list


@dataclass(frozen=True)
class Case:
    """A command line and what its failure must say: `names` starts the message (exit 1), or
    appears in typer's usage error (exit 2) when `usage`."""

    args: list[str | Path]
    names: str | Path
    words: tuple[str, ...] = ()
    usage: bool = False


class Inputs:
    """What a case builds its bad input from: the test's folder and the session's real data."""

    def __init__(self, request: pytest.FixtureRequest, folder: Path) -> None:
        self.request = request
        self.folder = folder
        self.marker = folder / "PICKLE-RAN"

    def __getattr__(self, fixture: str):  # the session fixtures, built only when a case asks
        return self.request.getfixturevalue(fixture)

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def folder_named(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def hostile(self, path: Path, payload: dict | None = None) -> Path:
        """A torch checkpoint whose unpickling would create `marker`: it must be refused."""
        torch.save({**(payload or {}), "model": _Hostile(str(self.marker))}, path)
        return path

    def run_copy(self, name: str, run: str = "pretrain") -> Path:
        copy = self.folder / name
        shutil.copytree(self.trained_runs[run], copy)
        return copy

    def index_without(self, column: str) -> Path:
        """The split index with one column dropped, landcover metadata kept."""
        table = pq.read_table(self.split_index).drop_columns([column])
        path = self.folder / f"no-{column}.parquet"
        pq.write_table(table, path)
        return path

    def index_with_metadata(self, text: bytes) -> Path:
        table = pq.read_table(self.split_index)
        metadata = {**table.schema.metadata, METADATA_KEY: text}
        path = self.folder / "bad-metadata.parquet"
        pq.write_table(table.replace_schema_metadata(metadata), path)
        return path

    def plain_parquet(self) -> Path:
        path = self.folder / "plain.parquet"
        pq.write_table(pa.table({"a": [1, 2, 3]}), path)
        return path

    def read_only(self) -> Path:
        return self.request.getfixturevalue("read_only_folder")


class _Hostile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _train(given: Inputs, *extra: str | Path, out: Path | None = None, index: Path | None = None) -> list[str | Path]:
    return [
        "train",
        index or given.split_index,
        "--method",
        "pretrain",
        "--iterations",
        "1",
        "--device",
        "cpu",
        "--out",
        out or given.folder / "run",
        *extra,
    ]


def _evaluate(given: Inputs, *runs: Path, index: Path | None = None, extra: tuple = ()) -> list[str | Path]:
    return [
        "evaluate",
        index or given.split_index,
        "--runs",
        *runs,
        "--episodes",
        "1",
        "--shots",
        "1",
        "--device",
        "cpu",
        "--out",
        given.folder / "report",
        *extra,
    ]


def _adapt(
    given: Inputs,
    *extra: str | Path,
    model: Path | str | None = None,
    image: Path | None = None,
    labels: Path | None = None,
    out: Path | None = None,
) -> list[str | Path]:
    scene: SceneFiles = given.scene_files
    return [
        "adapt",
        "--model",
        model or given.trained_runs["pretrain"],
        "--image",
        image or scene.image,
        "--labels",
        labels or scene.labels,
        "--out",
        out or given.folder / "map.tif",
        "--device",
        "cpu",
        *extra,
    ]


def _predict(
    given: Inputs, *extra: str | Path, model: Path | None = None, image: Path | None = None, out: Path | None = None
) -> list[str | Path]:
    return [
        "predict",
        "--model",
        model or given.trained_runs["pretrain"],
        "--image",
        image or given.scene_files.image,
        "--out",
        out or given.folder / "map.tif",
        "--device",
        "cpu",
        *extra,
    ]


def _with_blank_class(given: Inputs) -> Path:
    frame = gpd.read_file(given.scene_files.labels)
    frame.loc[frame.index[2], "class"] = "  "
    path = given.folder / "blank.gpkg"
    frame.to_file(path, layer="labels")
    return path


def _truncated_weights(given: Inputs) -> Path:
    run = given.run_copy("truncated-run")
    data = (run / "weights.pt").read_bytes()
    (run / "weights.pt").write_bytes(data[: len(data) // 2])
    return run


def _hostile_run(given: Inputs, name: str) -> Path:
    run = given.run_copy(name)
    given.hostile(run / "weights.pt")
    return run


def _tampered_resume(given: Inputs) -> tuple[Path, Path]:
    """A copy of the session's pretrain run, which `train` with its settings would resume, whose
    train_state.pt is a hostile pickle."""
    run = given.run_copy("resumable")
    given.hostile(run / "train_state.pt", {"iteration": 0})
    return run, run / "train_state.pt"


def _resume(given: Inputs, run: Path) -> list[str | Path]:
    """`train` with the settings of the session's pretrain run (tests/conftest.py): it resumes it."""
    return _train(
        given,
        "--iterations",
        "60",
        "--validate-every",
        "10",
        "--validation-episodes",
        "2",
        "--checkpoint-every",
        "10",
        out=run,
    )


def _resume_tampered(given: Inputs) -> Case:
    run, state = _tampered_resume(given)
    return Case(_resume(given, run), state, ("not a landcover checkpoint (refused to unpickle)",))


def _strict_ingest(given: Inputs, root: Path, bad_file: Path, words: str) -> Case:
    """`ingest --strict` of the dataset at `root`, which has one bad file: the failure names it."""
    return Case(
        ["ingest", root, "--source", "sen12ms", "--strict", "--out", given.folder / "i.parquet"], bad_file, (words,)
    )


def _other_settings_run(given: Inputs) -> Path:
    run = given.run_copy("other-settings")
    config = json.loads((run / "config.json").read_text())
    config["settings"]["shape"] = {"n_way": 7}
    (run / "config.json").write_text(json.dumps(config))
    return run


def _flow_config(given: Inputs, text: str) -> Path:
    return given.file("flow.yaml", text)


CASES: dict[str, Callable[[Inputs], Case]] = {
    # --- sample-data ----------------------------------------------------------------------------------
    "sample-data into an existing file": lambda g: Case(
        ["sample-data", g.file("taken", "x")], g.folder / "taken", ("is a file; OUT needs a folder",)
    ),
    "sample-data inside a file": lambda g: Case(
        ["sample-data", g.file("taken", "x") / "sub"], g.folder / "taken", ("is a file, not a folder",)
    ),
    "sample-data into a read-only folder": lambda g: Case(
        ["sample-data", g.read_only() / "data"], g.read_only(), ("is not writable",)
    ),
    "sample-data of an unknown kind": lambda g: Case(
        ["sample-data", g.folder / "d", "--kind", "landsat"],
        "--kind",
        ("'sen12ms', 'deepglobe', 'eurosat'",),
        usage=True,
    ),
    "sample-data of an unknown difficulty": lambda g: Case(
        ["sample-data", g.folder / "d", "--difficulty", "brutal"], "--difficulty", ("'default', 'hard'",), usage=True
    ),
    "sample-data too small": lambda g: Case(
        ["sample-data", g.folder / "d", "--size", "8"], "--size", ("greater than or equal to 16",), usage=True
    ),
    "sample-data scene with regions": lambda g: Case(
        ["sample-data", g.folder / "d", "--kind", "scene", "--regions", "3"], "--regions", ("one region",), usage=True
    ),
    "sample-data negative seed": lambda g: Case(
        ["sample-data", g.folder / "d", "--seed", "-1"], "--seed", ("greater than or equal to 0",), usage=True
    ),
    # --- ingest ---------------------------------------------------------------------------------------
    "ingest a missing root": lambda g: Case(
        ["ingest", g.folder / "nowhere", "--source", "sen12ms", "--out", g.folder / "i.parquet"],
        g.folder / "nowhere",
        ("no such folder",),
    ),
    "ingest a root that is a file": lambda g: Case(
        ["ingest", g.file("root.txt", "x"), "--source", "sen12ms", "--out", g.folder / "i.parquet"],
        g.folder / "root.txt",
        ("file",),
    ),
    "ingest an empty folder": lambda g: Case(
        ["ingest", g.folder_named("empty"), "--source", "sen12ms", "--out", g.folder / "i.parquet"],
        g.folder / "empty",
        ("no sen12ms patches",),
    ),
    "ingest a SEN12MS root as DeepGlobe": lambda g: Case(
        ["ingest", g.sen12ms_root, "--source", "deepglobe", "--out", g.folder / "i.parquet"],
        g.sen12ms_root,
        ("no DeepGlobe images",),
    ),
    "ingest a folder root without class folders": lambda g: Case(
        ["ingest", g.folder_named("flat"), "--source", "folder", "--out", g.folder / "i.parquet"],
        g.folder / "flat",
        ("no class folders",),
    ),
    "ingest an unknown source": lambda g: Case(
        ["ingest", g.sen12ms_root, "--source", "landsat", "--out", g.folder / "i.parquet"],
        "--source",
        ("'landsat' is not one of 'sen12ms', 'dfc2020', 'deepglobe', 'folder', 'pairs'",),
        usage=True,
    ),
    "ingest --out a folder": lambda g: Case(
        ["ingest", g.sen12ms_root, "--source", "sen12ms", "--out", g.folder_named("out")],
        g.folder / "out",
        ("is a folder; --out needs a file name",),
    ),
    "ingest --out in a read-only folder": lambda g: Case(
        ["ingest", g.sen12ms_root, "--source", "sen12ms", "--out", g.read_only() / "i.parquet"],
        g.read_only(),
        ("is not writable",),
    ),
    "ingest --out inside a file": lambda g: Case(
        ["ingest", g.sen12ms_root, "--source", "sen12ms", "--out", g.file("f", "x") / "i.parquet"],
        g.folder / "f",
        ("is a file, not a folder",),
    ),
    "ingest --grid 0": lambda g: Case(
        ["ingest", g.sen12ms_root, "--source", "deepglobe", "--grid", "0", "--out", g.folder / "i.parquet"],
        "--grid",
        ("greater than or equal to 1",),
        usage=True,
    ),
    "ingest --strict over a corrupt patch": lambda g: _strict_ingest(g, *_corrupt_patch(g), "cannot be opened"),
    "ingest --strict over a missing label file": lambda g: _strict_ingest(
        g, *_missing_label(g), "has no label file beside it"
    ),
    # --- regions --------------------------------------------------------------------------------------
    "regions of a missing index": lambda g: Case(
        ["regions", g.folder / "none.parquet", "--out", g.folder / "r.parquet"],
        g.folder / "none.parquet",
        ("no such index file",),
    ),
    "regions of random bytes": lambda g: Case(
        ["regions", g.file("junk.parquet", os.urandom(256)), "--out", g.folder / "r.parquet"],
        g.folder / "junk.parquet",
        ("is not a GeoParquet tile index",),
    ),
    "regions of a plain parquet": lambda g: Case(
        ["regions", g.plain_parquet(), "--out", g.folder / "r.parquet"],
        g.folder / "plain.parquet",
        ("not a GeoParquet tile index",),
    ),
    "regions of an index missing its columns": lambda g: Case(
        ["regions", g.index_without("source"), "--out", g.folder / "r.parquet"],
        g.folder / "no-source.parquet",
        ("no column(s) source",),
    ),
    "regions of an index with garbled metadata": lambda g: Case(
        ["regions", g.index_with_metadata(b"{not json"), "--out", g.folder / "r.parquet"],
        g.folder / "bad-metadata.parquet",
        ("unreadable landcover metadata",),
    ),
    "regions of an index with foreign metadata": lambda g: Case(
        ["regions", g.index_with_metadata(b'{"made by": "someone else"}'), "--out", g.folder / "r.parquet"],
        g.folder / "bad-metadata.parquet",
        ("landcover metadata without source",),
    ),
    "regions --by an unknown method": lambda g: Case(
        ["regions", g.split_index, "--by", "dbscan", "--out", g.folder / "r.parquet"],
        "--by",
        ("'metadata', 'kmeans'",),
        usage=True,
    ),
    "regions --split of two numbers": lambda g: Case(
        ["regions", g.split_index, "--split", "0.5,0.5", "--out", g.folder / "r.parquet"], "--split", (), usage=True
    ),
    "regions --split that is not numbers": lambda g: Case(
        ["regions", g.split_index, "--split", "most,some,rest", "--out", g.folder / "r.parquet"],
        "--split",
        (),
        usage=True,
    ),
    "regions --split and --split-file": lambda g: Case(
        [
            "regions",
            g.split_index,
            "--split",
            "0.6,0.2,0.2",
            "--split-file",
            g.file("s.yaml", "train: []"),
            "--out",
            g.folder / "r.parquet",
        ],
        "--split",
        ("not both",),
        usage=True,
    ),
    "regions --split-file missing": lambda g: Case(
        ["regions", g.split_index, "--split-file", g.folder / "none.yaml", "--out", g.folder / "r.parquet"],
        g.folder / "none.yaml",
        ("cannot read the split file",),
    ),
    "regions --split-file with an unknown split": lambda g: Case(
        [
            "regions",
            g.split_index,
            "--split-file",
            g.file("s.yaml", "train: [a]\nval: [b]\ntest: [c]\nholdout: [d]"),
            "--out",
            g.folder / "r.parquet",
        ],
        g.folder / "s.yaml",
        ("unknown split 'holdout'",),
    ),
    "regions --split-file that is not YAML": lambda g: Case(
        [
            "regions",
            g.split_index,
            "--split-file",
            g.file("s.yaml", "train: [unclosed"),
            "--out",
            g.folder / "r.parquet",
        ],
        g.folder / "s.yaml",
        ("is not valid",),
    ),
    "regions --column that is not in the index": lambda g: Case(
        ["regions", g.split_index, "--column", "country", "--out", g.folder / "r.parquet"], g.split_index, ("country",)
    ),
    "regions --out a folder": lambda g: Case(
        ["regions", g.split_index, "--out", g.folder_named("out")], g.folder / "out", ("is a folder",)
    ),
    "regions --k 0": lambda g: Case(
        ["regions", g.split_index, "--by", "kmeans", "--k", "0", "--out", g.folder / "r.parquet"],
        "--k",
        ("greater than or equal to 1",),
        usage=True,
    ),
    # --- train ----------------------------------------------------------------------------------------
    "train on an index without regions": lambda g: Case(
        ["train", g.sen12ms_index, "--out", g.folder / "run"], g.sen12ms_index, ("run `landcover regions` first",)
    ),
    "train on an index missing class counts": lambda g: Case(
        _train(g, index=g.index_without("class_counts")),
        g.folder / "no-class_counts.parquet",
        ("no column(s) class_counts",),
    ),
    "train an unknown method": lambda g: Case(_train(g, "--method", "siamese"), "siamese", ("protonet",), usage=True),
    "train an unknown task": lambda g: Case(_train(g, "--task", "detection"), "detection", (), usage=True),
    "train an unknown model size": lambda g: Case(_train(g, "--size", "huge"), "huge", (), usage=True),
    "train on an unknown device": lambda g: Case(_train(g, "--device", "tpu"), "--device", (), usage=True),
    "train --out an existing file": lambda g: Case(
        _train(g, out=g.file("run.txt", "x")), g.folder / "run.txt", ("is a file; --out needs a folder",)
    ),
    "train --out in a read-only folder": lambda g: Case(
        _train(g, out=g.read_only() / "run"), g.read_only(), ("is not writable",)
    ),
    "train --out holding a run of other settings": lambda g: Case(
        _train(g, out=_other_settings_run(g)), g.folder / "other-settings", ("holds a run with other settings",)
    ),
    "train --out holding a config that is not JSON": lambda g: Case(
        _train(g, out=g.file("garbled/config.json", "{oops").parent), g.folder / "garbled", ("not a training run's",)
    ),
    "train --init-from a folder that is not a run": lambda g: Case(
        _train(g, "--init-from", g.folder_named("empty-run")), g.folder / "empty-run", ("is not a run directory",)
    ),
    "train --init-from a hostile pickle": lambda g: Case(
        _train(g, "--init-from", _hostile_run(g, "hostile-run")),
        g.folder / "hostile-run" / "weights.pt",
        ("not a landcover checkpoint (refused to unpickle)",),
    ),
    "train --init-from truncated weights": lambda g: Case(
        _train(g, "--init-from", _truncated_weights(g)),
        g.folder / "truncated-run" / "weights.pt",
        ("truncated or corrupt",),
    ),
    "train resuming over a tampered train_state.pt": _resume_tampered,
    "train --shots 0": lambda g: Case(
        _train(g, "--shots", "0"), "--shots", ("greater than or equal to 1",), usage=True
    ),
    # --- evaluate -------------------------------------------------------------------------------------
    "evaluate a folder that is not a run": lambda g: Case(
        _evaluate(g, g.folder_named("not-a-run")), g.folder / "not-a-run", ("is not a run directory",)
    ),
    "evaluate a run with corrupt weights": lambda g: Case(
        _evaluate(g, _truncated_weights(g)), g.folder / "truncated-run" / "weights.pt", ("truncated or corrupt",)
    ),
    "evaluate a run with a hostile pickle": lambda g: Case(
        _evaluate(g, _hostile_run(g, "hostile-run")), g.folder / "hostile-run" / "weights.pt", ("refused to unpickle",)
    ),
    "evaluate a run whose config is not JSON": lambda g: Case(
        _evaluate(g, _garbled_config(g)), g.folder / "garbled-run" / "config.json", ("is not a landcover run config",)
    ),
    "evaluate --shots that are not numbers": lambda g: Case(
        _evaluate(g, g.trained_runs["pretrain"], extra=("--shots", "one,five")), "--shots", (), usage=True
    ),
    "evaluate an unknown protocol": lambda g: Case(
        _evaluate(g, g.trained_runs["pretrain"], extra=("--protocol", "random")), "--protocol", (), usage=True
    ),
    "evaluate --out an existing file": lambda g: Case(
        [*_evaluate(g, g.trained_runs["pretrain"])[:-1], g.file("report.txt", "x")],
        g.folder / "report.txt",
        ("is a file; --out needs a folder",),
    ),
    "evaluate on an index without splits": lambda g: Case(
        _evaluate(g, g.trained_runs["pretrain"], index=g.sen12ms_index),
        g.sen12ms_index,
        ("run `landcover regions` first",),
    ),
    # --- adapt and predict ----------------------------------------------------------------------------
    "adapt with blank class names": lambda g: Case(
        _adapt(g, labels=_with_blank_class(g)), g.folder / "blank.gpkg", ("1 features have no value", "row 2")
    ),
    "adapt --out in a read-only folder": lambda g: Case(
        _adapt(g, out=g.read_only() / "map.tif"), g.read_only(), ("is not writable",)
    ),
    "adapt --out inside a file": lambda g: Case(
        _adapt(g, out=g.file("f", "x") / "map.tif"), g.folder / "f", ("is a file, not a folder",)
    ),
    "adapt --save-adapted an existing file": lambda g: Case(
        _adapt(g, "--save-adapted", g.file("model.txt", "x")),
        g.folder / "model.txt",
        ("is a file; --save-adapted needs a folder",),
    ),
    "adapt --pick an unknown candidate": lambda g: Case(
        _adapt(g, "--pick", "oracle"), g.scene_files.labels, ("--pick 'oracle'",)
    ),
    "adapt a model that is missing": lambda g: Case(
        _adapt(g, model=g.folder / "no-run"), g.folder / "no-run", ("is not a run directory",)
    ),
    "adapt a hostile pickle": lambda g: Case(
        _adapt(g, model=_hostile_run(g, "hostile-run")),
        g.folder / "hostile-run" / "weights.pt",
        ("refused to unpickle",),
    ),
    "adapt --folds 1": lambda g: Case(
        _adapt(g, "--folds", "1"), "--folds", ("greater than or equal to 2",), usage=True
    ),
    "adapt on an unknown device": lambda g: Case(_adapt(g, "--device", "tpu"), "--device", (), usage=True),
    "predict with a hostile pickle": lambda g: Case(
        _predict(g, model=_hostile_run(g, "hostile-run")),
        g.folder / "hostile-run" / "weights.pt",
        ("refused to unpickle",),
    ),
    "predict with a hostile adapted head": lambda g: Case(
        _predict(g, model=_hostile_head(g)), g.folder / "hostile-head" / "head.pt", ("refused to unpickle",)
    ),
    "predict a missing scene": lambda g: Case(_predict(g, image=g.folder / "none.tif"), g.folder / "none.tif", ()),
    "predict a scene that is a text file": lambda g: Case(
        _predict(g, image=g.file("scene.tif", "not a raster\n")), g.folder / "scene.tif", ()
    ),
    "predict --out a folder": lambda g: Case(
        _predict(g, out=g.folder_named("out")), g.folder / "out", ("is a folder",)
    ),
    "predict --out in a read-only folder": lambda g: Case(
        _predict(g, out=g.read_only() / "map.tif"), g.read_only(), ("is not writable",)
    ),
    "predict with a classification model": lambda g: Case(
        _predict(g, model=_classification_run(g)), g.folder / "classification-run", ("is a classification model",)
    ),
    # --- run and serve --------------------------------------------------------------------------------
    "run a config of random bytes": lambda g: Case(
        ["run", "--config", g.file("flow.yaml", os.urandom(512) + b"\xff\xfe")],
        g.folder / "flow.yaml",
        ("is not a text file",),
    ),
    "run a config whose data root is missing": lambda g: Case(
        ["run", "--config", _flow_config(g, "data: {source: sen12ms, root: nowhere}\n")],
        g.folder / "flow.yaml",
        ("data.root:", "does not exist"),
    ),
    "run a config whose data root is a file": lambda g: Case(
        ["run", "--config", _flow_config(g, f"data: {{root: {g.file('root.txt', 'x')}}}\n")],
        g.folder / "flow.yaml",
        ("data.root:", "is not a folder"),
    ),
    "run a config whose adapt scene is missing": lambda g: Case(
        ["run", "--config", _flow_config(g, "adapt: {image: scene.tif, labels: labels.gpkg}\n")],
        g.folder / "flow.yaml",
        ("adapt.image:", "does not exist"),
    ),
    "run a missing config": lambda g: Case(
        ["run", "--config", g.folder / "none.yaml"], g.folder / "none.yaml", ("cannot read the flow config",)
    ),
    "run a config with an unknown key": lambda g: Case(
        ["run", "--config", _flow_config(g, "outptu: here\n")], g.folder / "flow.yaml", ("unknown key 'outptu'",)
    ),
    "run with --dask-address and --workers": lambda g: Case(
        ["run", "--dask-address", "tcp://127.0.0.1:1", "--workers", "2"], "not both", (), usage=True
    ),
    "serve a config of random bytes": lambda g: Case(
        ["serve", "--cron", "0 3 * * *", "--config", g.file("flow.yaml", b"\xff\xfe\x00garbage")],
        g.folder / "flow.yaml",
        ("is not a text file",),
    ),
}


def _small_sen12ms(given: Inputs, name: str) -> tuple[Path, Path]:
    """A SEN12MS-layout root of 8 patches (a full one takes seconds to scan), and one s2 patch."""
    root = write_sen12ms(given.folder / name, seed=0, regions=1, size=16, patches_per_region=4)
    return root, sorted(root.glob("ROIs*/s2_*/*.tif"))[1]


def _corrupt_patch(given: Inputs) -> tuple[Path, Path]:
    root, patch = _small_sen12ms(given, "broken")
    patch.write_bytes(b"II*\x00 not really a tiff")
    return root, patch


def _missing_label(given: Inputs) -> tuple[Path, Path]:
    root, s2 = _small_sen12ms(given, "unlabelled")
    (s2.parent.with_name("lc" + s2.parent.name.removeprefix("s2")) / s2.name.replace("_s2_", "_lc_")).unlink()
    return root, s2


def _garbled_config(given: Inputs) -> Path:
    run = given.run_copy("garbled-run")
    (run / "config.json").write_text("{not: json")
    return run


def _hostile_head(given: Inputs) -> Path:
    run = given.run_copy("hostile-head")
    given.hostile(run / "head.pt", {"features": "network"})
    return run


def _classification_run(given: Inputs) -> Path:
    run = given.run_copy("classification-run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "task": "classification"}))
    return run


# --- the harness --------------------------------------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write in: a read-only tmpfs for root (who ignores permissions), else
    a folder without write permission."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _state(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under the roots with its size and modification time."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            stat = path.lstat()
            state[str(path)] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns if path.is_file() else 0)
    return state


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_line_and_changes_nothing(
    case: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a step that wrongly writes beside the working folder would show
    given = Inputs(request, tmp_path / "case")
    given.folder.mkdir()
    built = CASES[case](given)
    watched = [
        tmp_path,
        *(path for path in map(Path, map(str, built.args)) if path.exists() and not path.is_relative_to(tmp_path)),
    ]
    before = _state(*watched)
    result = runner.invoke(app, [str(arg) for arg in built.args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if built.usage:
        assert result.exit_code == 2, result.output
        assert str(built.names) in result.output
    else:
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()  # a progress bar may come before, never after
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
        assert lines[-1].startswith(f"error: {built.names}: "), lines[-1]
    for words in built.words:
        assert words in result.output, result.output
    assert not given.marker.exists(), "a pickle's code ran"
    assert _state(*watched) == before, "the command wrote or changed files"
