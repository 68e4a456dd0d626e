"""The Prefect flows: the flow config, cache keys, the cached re-run, retries and the artifacts.

Flows run against the session's temporary Prefect server (tests/conftest_prefect.py); what they
did is read back through the Prefect client, as the UI would show it.
"""

from __future__ import annotations

import base64
import errno
import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
import torch
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowFilter,
    FlowFilterName,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL

from flows import steps
from flows.caching import FileInputs, fingerprint
from flows.flows import end_to_end
from geo.errors import DataError
from pipeline.config import FlowConfig, beside, load_config, suggest_settings
from pipeline.report import write_report
from tests.conftest_prefect import task_states

CACHED_STEPS = ("sample-data", "index-part", "write-index", "regions")

# --- the flow config ------------------------------------------------------------------------


def test_no_config_runs_every_step_on_sample_data() -> None:
    config = load_config(None)
    assert config == FlowConfig()
    assert config.data.root is None and [m.name for m in config.methods] == ["maml", "pretrain"]
    assert config.adapt is not None and config.adapt_run == "maml-seed0"


def test_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "flow.yaml"
    for scene in ("conf/a/one.tif", "conf/b/two.tif"):
        (tmp_path / scene).parent.mkdir(parents=True)
        (tmp_path / scene).touch()
    (tmp_path / "eurosat").mkdir()
    path.write_text(
        "output: out\ndata: {source: folder, root: ../eurosat}\n"
        "methods: {fast: {method: fomaml, iterations: 5, shape: {n_way: 3}},\n"
        "          proto: {method: protonet}, plus: {method: mamlpp, second_order_from: 0.2}}\n"
        "evaluation: {shots: [1, 5]}\nadapt: {scenes: [a/one.tif, b/two.tif]}\n"
    )
    config = load_config(path)
    assert config.output == path.parent / "out"
    assert config.data.root == tmp_path / "conf" / ".." / "eurosat"
    method, proto, plus = config.methods
    assert (method.name, method.method, method.settings["iterations"]) == ("fast", "fomaml", 5)
    assert (proto.method, plus.method, plus.settings["second_order_from"]) == ("protonet", "mamlpp", 0.2)
    assert config.evaluation.shots == (1, 5)
    assert config.adapt_run == "fast-seed0"
    assert config.adapt is not None
    assert config.layout.prediction(config.adapt.scenes[1]) == config.output / "maps" / "two.tif"
    assert config.adapt.extras == () and suggest_settings(config) is None  # no extra file unless asked


def test_the_adapt_step_writes_the_files_the_yaml_asks_for_beside_every_map(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text("output: out\nadapt: {confidence: true, vector: true, suggest: 4, suggest_spacing: 20}\n")
    config = load_config(path)
    assert config.adapt is not None and config.adapt.extras == ("confidence", "vector")
    adapted = config.layout.adapted_map
    assert beside(adapted, config.adapt.extras) == {
        "confidence": adapted.with_name("map.confidence.tif"),
        "vector": adapted.with_name("map.gpkg"),
    }
    suggestions = tmp_path / "out" / "adapt" / "suggestions.gpkg"
    assert suggest_settings(config) == {"count": 4, "out": suggestions, "spacing": 20}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {sourc: sen12ms}", "data: unknown key 'sourc'; known keys: source, root, classes"),
        ("data: {source: eurosat}", "data.source: 'eurosat' is not one of sen12ms, dfc2020, deepglobe, folder, pairs"),
        # sources that take a classes file, or that the generator does not write
        ("data: {source: pairs, root: .}", "data: the pairs source needs classes: (its classes file)"),
        ("data: {classes: c.yaml}", "data: classes: does not apply to the sen12ms source"),
        ("data: {source: dfc2020}", "data: the dfc2020 source has no sample data: give root:"),
        ("data: {source: pairs, root: ., classes: c.yaml}", "data.classes: "),
        ("evaluation: {episodes: many}", "evaluation.episodes: expected int, got 'many'"),
        ("methods: {maml: {iteratons: 3}}", "methods.maml: unknown key 'iteratons'"),
        ("methods: {m: {method: siamese}}", "methods.m: method: 'siamese' is not one of protonet, reptile, anil"),
        ("methods: {maml: {seed: 3}}", "'seed' is set for all methods at the top of the file"),
        ("methods: {}", "adapt needs a trained model"),
        ("seeds: []", "seeds: expected 1 or more items, got 0"),
        ("data: {grid: 0}", "data.grid: must be at least 1, got 0"),
        ("adapt: {method: random}", "adapt.method 'random' is none of methods"),
        ("- a list", "the file must hold a mapping"),
        ("data: [unclosed", "cannot read the flow config"),
        ("data: {root: nowhere}", "data.root: "),
        ("adapt: {image: scene.tif, labels: labels.gpkg}", "adapt.image: "),
        # unknown keys, in the file's own parts and in a step's settings, named with the keys known there
        ("adapt: {mapp: {}}", "adapt: unknown key 'mapp'; known keys: method, image, labels, scenes, map, prob"),
        ("methods: {maml: {shape: {n_wy: 3}}}", "methods.maml.shape: unknown key 'n_wy'; known keys: n_way, k_shot"),
        ("adapt: {map: {foldz: 2}}", "adapt.map: unknown key 'foldz'; known keys: steps, lr, class_column"),
        # wrong types: the key and the type it takes
        ("data: {strict: maybe}", "data.strict: expected true or false, got 'maybe'"),
        ("methods: {maml: {lr: fast}}", "methods.maml.lr: expected a number, got 'fast'"),
        ("evaluation: {shots: [1, five]}", "evaluation.shots[1]: expected int, got 'five'"),
        ("methods: {maml: 3}", "methods.maml: expected a mapping, got 3"),
        # choices: the allowed values
        ("regions: {by: dbscan}", "regions.by: 'dbscan' is not one of metadata, kmeans"),
        ("task: detection", "task: 'detection' is not one of classification, segmentation"),
        ("device: tpu", "device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        ("regions: {split: {holdout: [a]}}", "regions.split.holdout: 'holdout' is not one of train, val, test"),
        # ranges, and every mistake of the file at once
        ("regions: {split: [0.5, 0.5]}", "regions.split: expected 3 or more items, got 2"),
        ("data: {sample: {size: 8}}", "data.sample.size: must be at least 16, got 8"),
        ("adapt: {suggest: 0}", "adapt.suggest: must be at least 1, got 0"),
        ("adapt: {suggest: 5, suggest_spacing: -1}", "adapt.suggest_spacing: must be at least 0, got -1"),
        # the maps of two scenes, or the files beside them, would have one name
        ("adapt: {scenes: [a/x.tif, b/x.tif]}", "adapt: two of scenes would write the same file, maps/x.tif"),
        (
            "adapt: {confidence: true, scenes: [a/x.tif, b/x.confidence.tif]}",
            "adapt: two of scenes would write the same file, maps/x.confidence.tif",
        ),
        ("data: {strict: maybe, grid: 0}", "data.strict: expected true or false, got 'maybe'; data.grid: must be at"),
    ],
)
def test_config_mistakes_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


# --- cache keys -----------------------------------------------------------------------------


def test_fingerprints_see_a_touched_file_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    patch = tmp_path / "a" / "p.tif"
    patch.write_bytes(b"pixels")
    before = fingerprint(tmp_path)
    assert before == [("a/p.tif", 6, patch.stat().st_mtime_ns)]
    os.utime(patch, ns=(patch.stat().st_atime_ns, patch.stat().st_mtime_ns + 1_000_000))
    assert fingerprint(tmp_path) != before
    assert fingerprint(tmp_path / "missing") == []


def test_cache_keys_hash_read_files_but_only_the_names_of_written_ones(tmp_path: Path) -> None:
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("a")
    policy = FileInputs(writes=("out",))
    first = _key(policy, {"source": source, "out": out, "k": 3})
    out.write_text("written by the step")
    assert _key(policy, {"source": source, "out": out, "k": 3}) == first
    source.write_text("changed")
    assert _key(policy, {"source": source, "out": out, "k": 3}) != first
    assert _key(policy, {"source": source, "out": out, "k": 4}) != first


@pytest.mark.parametrize("value", [torch.zeros(2), pd.DataFrame({"a": [1]})])
def test_cache_keys_refuse_tensors_and_frames(value: object) -> None:
    with pytest.raises(TypeError, match="argument 'value': a cache key takes paths and plain"):
        _key(FileInputs(), {"value": value})


def _key(policy: FileInputs, inputs: dict[str, object]) -> str | None:
    return policy.compute_key(None, inputs, {})  # type: ignore[arg-type]  # no task context needed


# --- the end-to-end flow, run three times ---------------------------------------------------


def _last_end_to_end_run() -> UUID:
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["landcover-end-to-end"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        assert run.state is not None and run.state.is_completed()
        return run.id


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_second_run_in_a_new_process_reuses_every_unchanged_step(tmp_path: Path) -> None:
    config = tmp_path / "flow.yaml"
    config.write_text(
        "output: out\ndata: {sample: {regions: 3, size: 16}, files_per_task: 64}\nmethods: {}\nadapt: null\n"
    )
    # 3 scenes x 2 seasons x 64 patches = 384 files: 6 index parts
    steps_in_a_run = {"sample-data": 1, "plan-ingest": 1, "index-part": 6, "write-index": 1}
    steps_in_a_run |= {"regions": 1}

    state = end_to_end(str(config), return_state=True)
    outputs = state.result()
    first = task_states(state.state_details.flow_run_id, steps_in_a_run)
    assert first == {name: ["Completed"] * count for name, count in steps_in_a_run.items()}
    regions_written = outputs.regions.stat().st_mtime_ns

    # The same config, from the command line in a new process: only the file listing runs.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"index: {outputs.regions}" in done.stdout
    second = task_states(_last_end_to_end_run(), steps_in_a_run)
    assert {name: second[name] for name in CACHED_STEPS} == {
        "sample-data": ["Cached"],
        "index-part": ["Cached"] * 6,
        "write-index": ["Cached"],
        "regions": ["Cached"],
    }
    assert second["plan-ingest"] == ["Completed"]  # never cached: it finds new files
    assert outputs.regions.stat().st_mtime_ns == regions_written

    # One patch touched: its part is read again, and every step after it runs again.
    patch = sorted((outputs.index.parent / "sample-data").glob("*/s2_*/*.tif"))[100]
    stat = patch.stat()
    os.utime(patch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    state = end_to_end(str(config), return_state=True)
    third = task_states(state.state_details.flow_run_id, steps_in_a_run)
    assert sorted(third["index-part"]) == ["Cached"] * 5 + ["Completed"]
    assert (third["sample-data"], third["write-index"], third["regions"]) == (["Cached"], ["Completed"], ["Completed"])


# --- retries and artifacts ------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_an_io_task_gets_through_two_os_errors_but_not_a_data_error(tmp_path: Path) -> None:
    attempts: list[str] = []

    @task(**{**steps.IO_RETRIES, "retry_delay_seconds": 0})
    def read(path: Path, failures: int, error: Exception) -> str:
        attempts.append(path.name)
        if attempts.count(path.name) <= failures:
            raise error
        return path.read_text()

    @flow
    def reads(path: Path, failures: int, error: Exception) -> str:
        return read(path, failures, error)

    ok = tmp_path / "ok.txt"
    ok.write_text("pixels")
    assert reads(ok, 2, OSError(errno.EIO, "Input/output error")) == "pixels"
    assert attempts.count("ok.txt") == 3

    bad = tmp_path / "bad.txt"
    with pytest.raises(DataError):
        reads(bad, 2, DataError(bad, "not a GeoTIFF"))
    assert attempts.count("bad.txt") == 1
    for io_step in (steps.plan_ingest, steps.index_part, steps.write_index, steps.regions):
        assert io_step.retries == 2 and io_step.retry_condition_fn is steps.is_io_error


@pytest.mark.usefixtures("prefect_harness")
def test_the_evaluation_table_and_plot_are_flow_run_artifacts(tmp_path: Path) -> None:
    accuracy = np.array([0.7, 0.75, 0.8, 0.5, 0.55, 0.6])
    results = pd.DataFrame(
        {
            "method": ["maml"] * 3 + ["pretrain"] * 3,
            "shots": [0, 1, 5] * 2,
            "accuracy": accuracy,
            "accuracy_low": accuracy - 0.05,
            "accuracy_high": accuracy + 0.05,
            **{metric: np.nan for metric in ("kappa", "f1", "miou")},
        }
    )
    files = write_report(results, tmp_path / "evaluation", title="test")

    @flow
    def publish() -> None:
        steps.publish_report(files.table, files.plot, files.markdown)

    publish()
    with get_client(sync_client=True) as client:
        table, plot = (
            client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                limit=1,
            )[0]
            for key in ("evaluation-table", "accuracy-vs-shots")
        )
    assert table.type == plot.type == "markdown"
    assert isinstance(table.data, str) and isinstance(plot.data, str)  # a markdown artifact's data is its text
    assert files.table in table.data and "| maml | 0.700 ± 0.050 |" in table.data
    encoded = plot.data.split("data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(encoded) == files.plot.read_bytes()
