"""Faults survived with nothing lost, each caused for real: no mocks, no fake errors.

- `kill -9` during `predict`, `adapt`, `ingest` and `regions` (a subprocess, SIGKILLed while it
  writes, or for ingest while it indexes): whatever was at --out before is still there, byte for
  byte, or nothing is; nothing at --out looks finished. The re-run succeeds, gives a valid output
  and removes the temporary files the killed process could not (`geo.atomic`).
- A full disk (a small tmpfs mounted as the output folder, filled up) during `ingest`, `train`
  checkpointing and `predict`: one line `error: FOLDER: no space left on device while writing
  NAME`, exit status 1, no partial or temporary file; the previous checkpoint still loads and
  training resumes from it once there is space.
- A Dask worker SIGKILLed during a two-worker ingest flow: the flow completes with the very index
  an undisturbed ingest writes.
- The Prefect server that a `landcover run` started, SIGKILLed during the run: one clear line,
  exit status 1, and the next run reuses every step that had completed.
- Two `adapt`s writing the same --out at the same time: the map, its style, reports,
  probabilities and polygons all come from one of them (`geo.atomic.output_group`).

Every kill waits for a file to appear (a temporary beside --out with bytes in it, a progress line,
the index), never for a length of time. The slowest processes start with the module (`early`) so
that their start overlaps the other tests. Mounting needs root: without it the full-disk tests are
skipped, saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate
from typer.testing import CliRunner

from geo.classes import DFC10
from geo.index import read_index, write_index
from geo.sample_data import SceneFiles, write_scene
from pipeline.cli import app
from tests.conftest_prefect import task_states

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str | Path | float):
    return runner.invoke(app, [str(arg) for arg in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(path: Path) -> list[str]:
    """Hidden temporary and scratch files of `path` (`.NAME.<pid>@<host>.<random>.part...`)."""
    return sorted(entry.name for entry in path.parent.iterdir() if entry.name.startswith(f".{path.name}."))


def writing(path: Path) -> bool:
    """Whether a temporary file of `path` holds some bytes: the process is writing it."""
    for name in temporaries(path):
        with contextlib.suppress(OSError):
            if (path.parent / name).stat().st_size > 0:
                return True
    return False


def visible(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))


# --- shared inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(split_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny segmentation run (ProtoNet: no fine-tuning budget to pick, so a second to train)."""
    from pipeline.train import TrainConfig, train

    config = TrainConfig(
        method="protonet", iterations=2, validate_every=1, validation_episodes=1, checkpoint_every=1, device="cpu"
    )
    return train(split_index, tmp_path_factory.mktemp("faults-run") / "run", config, progress=False).run_dir


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory: pytest.TempPathFactory) -> SceneFiles:
    """A 1024 px scene: mapping it writes for a second or more, long enough to be killed at it."""
    return write_scene(tmp_path_factory.mktemp("big-scene"), seed=1, size=1024)


# --- processes killed, and started early ----------------------------------------------------------


class Killed:
    """`landcover ARGS` in a new process, and a thread that SIGKILLs it the moment `ready()`."""

    def __init__(self, command: list[Any], log: Path, ready: Callable[[], bool], **facts: Any) -> None:
        self.log = log
        self.facts = facts
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", *map(str, command)],
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.problem: str | None = None
        self.thread = threading.Thread(target=self._kill_when, args=(ready,), daemon=True)
        self.thread.start()

    def _kill_when(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 300
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.problem = (
                    f"the command ended ({self.process.poll()}) or took too long before the moment to kill it"
                )
                return
            time.sleep(0.002)
        self.process.send_signal(signal.SIGKILL)

    def wait(self) -> None:
        """Wait for the kill; fail when it did not come at the moment asked."""
        self.thread.join(320)
        self.close()
        if self.problem is not None:
            pytest.fail(f"{self.problem}:\n{self.log.read_text(errors='replace')[-3000:]}")
        assert self.process.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class StoppedServerRun:
    """`landcover run` in a new process, on the Prefect server it starts itself, and a thread that
    SIGKILLs that server as soon as ingest has written the index."""

    def __init__(self, folder: Path) -> None:
        self.config = folder / "flow.yaml"
        self.config.write_text(
            "output: out\ndata: {sample: {regions: 3, size: 16}, files_per_task: 64}\nmethods: {}\nadapt: null\n"
        )
        self.output = folder / "out"
        self.index = self.output / "index.parquet"
        self.log = folder / "run.log"
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = str(folder / "prefect-home")  # its own server and database
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(  # a session of its own: `close` ends it with its server
                [sys.executable, "-m", "pipeline.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.problem: str | None = None
        self.watcher = threading.Thread(target=self._stop_the_server, daemon=True)
        self.watcher.start()

    def _stop_the_server(self) -> None:
        deadline = time.monotonic() + 300
        while not self.index.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.problem = "the run ended, or took too long, before ingest wrote the index"
                return
            time.sleep(0.01)
        servers = [child for child in _children(self.process.pid) if b"uvicorn" in _command_line(child)]
        if not servers:
            self.problem = "found no server process started by the run"
            return
        os.kill(servers[0], signal.SIGKILL)

    def finish(self) -> tuple[int | None, str]:
        """The run's exit status and output, once it has ended."""
        self.watcher.join(300)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(300)
        return self.process.poll(), self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # the run and the server it started
            self.process.wait()


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    children.append(int(entry.name))
    return children


def _command_line(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


PREDICT_KILL = "test_kill_9_while_predict_writes_leaves_the_previous_map_and_a_rerun_maps"
ADAPT_KILL = "test_kill_9_while_adapt_writes_leaves_no_map_and_a_rerun_maps"
SERVER_STOP = "test_the_prefect_server_stopped_during_a_run_is_one_line_and_the_next_run_reuses_what_completed"


@dataclass
class Early:
    """Processes started with the module for the tests named above, by test name."""

    started: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)
    """What went wrong starting one: that test (alone) fails with it."""

    def take(self, test: str) -> Any:
        if test in self.failed:
            raise self.failed[test]
        return self.started[test]


@pytest.fixture(scope="module", autouse=True)
def early(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Early]:
    """The slowest processes start with the module when their tests are selected: their start
    (importing torch: seconds; a Prefect server on a new database: half a minute) overlaps the
    other tests, and each of those tests then waits for its own process."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    starts: dict[str, Callable[[Path], Any]] = {
        SERVER_STOP: StoppedServerRun,
        PREDICT_KILL: lambda folder: _killed_predict(request, folder),
        ADAPT_KILL: lambda folder: _killed_adapt(request, folder),
    }
    early = Early()
    try:
        for test, start in starts.items():
            if test in selected:
                try:
                    early.started[test] = start(tmp_path_factory.mktemp("early"))
                except Exception as error:  # the test it was for fails with it
                    early.failed[test] = error
        yield early
    finally:
        for process in early.started.values():
            process.close()


def _killed_predict(request: pytest.FixtureRequest, folder: Path) -> Killed:
    """A map (of the small scene) at --out, then `predict` of the big scene onto it, SIGKILLed as
    soon as it is writing a temporary file beside --out."""
    run_dir, scene_files, big_scene = (
        request.getfixturevalue(name) for name in ("run_dir", "scene_files", "big_scene")
    )
    out = folder / "map.tif"
    previous = invoke("predict", "--model", run_dir, "--image", scene_files.image, "--out", out, "--device", "cpu")
    assert previous.exit_code == 0, previous.output
    before = {path: digest(path) for path in (out, out.with_suffix(".qml"))}
    args = ["predict", "--model", run_dir, "--image", big_scene.image, "--out", out, "--device", "cpu"]
    return Killed(args, folder / "predict.log", lambda: writing(out), out=out, before=before, args=args)


def _killed_adapt(request: pytest.FixtureRequest, folder: Path) -> Killed:
    """`adapt` of the big scene (by the pixel classifier: its map takes about a second to write)
    into an empty folder, SIGKILLed as soon as it is writing a temporary file beside --out."""
    big_scene = request.getfixturevalue("big_scene")
    out = folder / "map.tif"
    args = [
        "adapt",
        "--model",
        "pixel",
        "--image",
        big_scene.image,
        "--labels",
        big_scene.labels,
        "--out",
        out,
        "--probabilities",
        folder / "probabilities.tif",
        "--no-check",
        "--device",
        "cpu",
    ]
    return Killed(args, folder / "adapt.log", lambda: writing(out), out=out, args=args)


# --- kill -9 ----------------------------------------------------------------------------------


def test_kill_9_while_predict_writes_leaves_the_previous_map_and_a_rerun_maps(
    early: Early, big_scene: SceneFiles
) -> None:
    killed = early.take(PREDICT_KILL)
    killed.wait()
    out, before = killed.facts["out"], killed.facts["before"]
    assert {path: digest(path) for path in before} == before  # the previous map and style, untouched
    assert visible(out.parent) == ["map.qml", "map.stac.json", "map.tif", "predict.log"]
    assert temporaries(out)  # killed while writing: its temporaries are left behind...

    again = invoke(*killed.facts["args"])
    assert again.exit_code == 0, again.output
    assert temporaries(out) == []  # ...and the next run removes them
    valid, errors, _ = cog_validate(out)
    assert valid, errors
    with rasterio.open(out) as src, rasterio.open(big_scene.image) as scene:
        assert (src.width, src.height, src.crs) == (scene.width, scene.height, scene.crs)


def test_kill_9_while_adapt_writes_leaves_no_map_and_a_rerun_maps(early: Early) -> None:
    killed = early.take(ADAPT_KILL)
    killed.wait()
    out = killed.facts["out"]
    probabilities = out.with_name("probabilities.tif")
    assert visible(out.parent) == ["adapt.log"]  # no map, style or probabilities
    assert temporaries(out)

    again = invoke(*killed.facts["args"])
    assert again.exit_code == 0, again.output
    assert temporaries(out) == [] and temporaries(probabilities) == []
    assert visible(out.parent) == ["adapt.log", "map.qml", "map.stac.json", "map.tif", "probabilities.tif"]
    assert cog_validate(out)[0] and cog_validate(probabilities)[0]


def test_kill_9_while_regions_writes_leaves_the_previous_index_and_a_rerun_writes(
    split_index: Path, sen12ms_index: Path, tmp_path: Path
) -> None:
    # an index of 100 000 tiles: writing it takes long enough to be killed while at it
    frame, metadata = read_index(sen12ms_index)
    big = write_index(pd.concat([frame] * 200, ignore_index=True), tmp_path / "big.parquet", metadata)
    out = tmp_path / "regions.parquet"
    shutil.copyfile(split_index, out)
    before = digest(out)

    Killed(["regions", big, "--out", out], tmp_path / "regions.log", lambda: writing(out)).wait()
    assert digest(out) == before
    assert temporaries(out)

    again = invoke("regions", big, "--out", out)
    assert again.exit_code == 0, again.output
    assert temporaries(out) == []
    written, written_metadata = read_index(out)
    assert len(written) == 200 * len(frame) and written["split"].notna().all()
    assert written_metadata["regions"]["method"] == "metadata"


def test_kill_9_while_ingest_works_leaves_the_previous_index_and_a_rerun_writes(
    sen12ms_root: Path, sen12ms_index: Path, tmp_path: Path
) -> None:
    """Writing an index of a few thousand tiles takes milliseconds, too short to aim a kill at
    (the regions test above kills the same writer, `geo.index.write_index`, mid-write): ingest
    is killed while it reads and indexes the files, once its progress bar has moved."""
    out = tmp_path / "index.parquet"
    shutil.copyfile(sen12ms_index, out)
    before = digest(out)
    log = tmp_path / "ingest.log"
    moved = re.compile(r"\b[1-9]\d*/\d+ ")
    Killed(
        ["ingest", sen12ms_root, "--source", "sen12ms", "--out", out, "--workers", "1"],
        log,
        lambda: bool(moved.search(log.read_text(errors="replace"))),
    ).wait()
    assert digest(out) == before

    again = invoke("ingest", sen12ms_root, "--source", "sen12ms", "--out", out)
    assert again.exit_code == 0, again.output
    assert temporaries(out) == []
    pd.testing.assert_frame_equal(read_index(out)[0], read_index(sen12ms_index)[0])


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`small_disk("8m")`: a fresh tmpfs of that size, mounted for the test and unmounted after."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no `mount` command to mount a small tmpfs as a full disk")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounted:
            if subprocess.run(["umount", str(folder)], check=False, capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` with one file, leaving about `leave` bytes free."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):
        handle.write(bytes(max(0, stat.f_bavail * stat.f_frsize - leave)))
    return filler


def assert_full_disk_error(output: str, folder: Path, names: tuple[str, ...]) -> None:
    """One line, `error: FOLDER: no space left on device while writing NAME`, NAME one of `names`."""
    lines = error_lines(output)
    assert len(lines) == 1, output
    prefix = f"error: {folder}: no space left on device while writing "
    assert lines[0].startswith(prefix) and lines[0][len(prefix) :].split(" ")[0] in names, output
    assert "Traceback" not in output


def test_a_full_disk_during_ingest_is_one_line_naming_the_folder_and_leaves_nothing(
    sen12ms_root: Path, small_disk: Callable[[str], Path]
) -> None:
    disk = small_disk("64k")  # the index is larger
    result = invoke("ingest", sen12ms_root, "--source", "sen12ms", "--out", disk / "index.parquet")
    assert result.exit_code == 1, result.output
    assert_full_disk_error(result.output, disk, ("index.parquet",))
    assert list(disk.iterdir()) == []


def test_a_full_disk_during_predict_keeps_the_previous_map_and_leaves_no_partial_file(
    run_dir: Path, scene_files: SceneFiles, big_scene: SceneFiles, small_disk: Callable[[str], Path]
) -> None:
    disk = small_disk("1m")
    out = disk / "map.tif"
    previous = invoke("predict", "--model", run_dir, "--image", scene_files.image, "--out", out, "--device", "cpu")
    assert previous.exit_code == 0, previous.output
    before = {path.name: digest(path) for path in disk.iterdir()}
    filler = fill(disk, leave=64 * 1024)  # the big scene's map does not fit in what is left

    result = invoke(
        "predict",
        "--model",
        run_dir,
        "--image",
        big_scene.image,
        "--out",
        out,
        "--probabilities",
        disk / "probabilities.tif",
        "--device",
        "cpu",
    )
    assert result.exit_code == 1, result.output
    assert_full_disk_error(result.output, disk, ("map.tif", "probabilities.tif"))
    filler.unlink()
    assert {path.name: digest(path) for path in disk.iterdir()} == before  # map.tif, map.qml as they were


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_training_resumes_from_it(
    split_index: Path, small_disk: Callable[[str], Path]
) -> None:
    from models.checkpoint import TRAIN_STATE, load_checkpoint, load_run

    disk = small_disk("8m")
    run = disk / "run"

    def train(iterations: int):
        return invoke(
            "train",
            split_index,
            "--method",
            "protonet",
            "--iterations",
            iterations,
            "--validate-every",
            1,
            "--validation-episodes",
            1,
            "--checkpoint-every",
            1,
            "--device",
            "cpu",
            "--out",
            run,
        )

    first = train(2)
    assert first.exit_code == 0, first.output
    filler = fill(disk, leave=96 * 1024)  # less than one checkpoint

    failed = train(4)
    assert failed.exit_code == 1, failed.output
    assert_full_disk_error(failed.output, run, ("weights.pt", "config.json", TRAIN_STATE))
    assert sorted(path.name for path in run.iterdir()) == ["config.json", TRAIN_STATE, "weights.pt"]
    assert load_checkpoint(run / TRAIN_STATE)["iteration"] == 2  # the previous checkpoint loads
    load_run(run)

    filler.unlink()  # space again: training resumes where the last checkpoint left it
    resumed = train(4)
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from iteration 2" in resumed.output
    assert load_checkpoint(run / TRAIN_STATE)["iteration"] == 4


# --- a Dask worker killed -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_dask_worker_killed_during_ingest_the_flow_still_writes_the_same_index(
    sen12ms_root: Path, sen12ms_index: Path, tmp_path: Path
) -> None:
    from distributed import Client

    from flows.dask import dask_runner
    from flows.flows import ingest_flow

    out = tmp_path / "dask.parquet"
    killed: dict[str, int] = {}
    with dask_runner(workers=2) as runner:
        assert runner is not None
        with Client(runner.address) as client:
            pids = client.run(os.getpid)

            def kill_a_busy_worker() -> None:  # the first worker seen with a task in hand
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not killed:
                    busy = [worker for worker, tasks in client.processing().items() if tasks and worker in pids]
                    if busy:
                        os.kill(pids[busy[0]], signal.SIGKILL)
                        killed[busy[0]] = pids[busy[0]]
                    time.sleep(0.01)

            killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
            killer.start()
            state = ingest_flow.with_options(
                task_runner=runner,  # type: ignore[arg-type]  # prefect_dask's typing: see flows.dask
                result_storage=tmp_path / "cache",
            )("sen12ms", sen12ms_root, out, files_per_task=32, return_state=True)
            killer.join(10)
            after = client.run(os.getpid)
    assert killed, "no worker was ever busy to be killed"
    assert set(killed.values()).isdisjoint(after.values())  # that worker process is gone (replaced)
    assert state.is_completed() and state.result() == out
    parts = task_states(state.state_details.flow_run_id, {"index-part": 16})["index-part"]
    assert parts.count("Completed") == 16  # 512 files, 32 per task: every part indexed
    expected_frame, expected_metadata = read_index(sen12ms_index)
    frame, metadata = read_index(out)
    pd.testing.assert_frame_equal(frame, expected_frame)
    assert metadata == expected_metadata


# --- the Prefect server stopped ---------------------------------------------------------------------


FINISHED = re.compile(r"Task run '(?P<name>[a-z-]+)-[0-9a-f]+' - Finished in state Completed\(\)")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_the_prefect_server_stopped_during_a_run_is_one_line_and_the_next_run_reuses_what_completed(
    early: Early,
) -> None:
    from flows.flows import end_to_end

    run = early.take(SERVER_STOP)
    status, output = run.finish()
    assert run.problem is None, f"{run.problem}:\n{output[-3000:]}"
    assert status == 1, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 1, output[-3000:]
    assert re.fullmatch(
        rf"error: {re.escape(str(run.output))}: the Prefect server at http://127\.0\.0\.1:\d+/api stopped "
        r"during the run \(.+\); the steps that completed are kept in \.prefect-cache here and the next "
        r"`landcover run` reuses them",
        lines[0],
    ), lines[0]
    completed = [match["name"] for match in FINISHED.finditer(output)]
    assert {"sample-data", "index-part"} <= set(completed), output[-3000:]  # write-index: racing the kill
    index_written = run.index.stat().st_mtime_ns

    # The next run (against the session's server): every step that had completed is reused.
    state = end_to_end(str(run.config), return_state=True)
    assert state.is_completed()
    steps = {"sample-data": 1, "index-part": 6, "write-index": 1, "regions": 1}
    second = task_states(state.state_details.flow_run_id, steps)
    for name in set(completed) - {"plan-ingest"}:  # listing files is never cached, by design
        assert second[name] == ["Cached"] * completed.count(name), (name, second)
    if "write-index" in completed:
        assert run.index.stat().st_mtime_ns == index_written


# --- two adapts, one output -----------------------------------------------------------------------


def test_two_adapts_writing_the_same_out_at_once_leave_one_complete_map_never_a_mix(
    scene_files: SceneFiles, tmp_path: Path
) -> None:
    """Two adapts with disjoint classes write the same outputs, in two threads (the lock is an
    `flock`, which threads with their own descriptors contend for just as processes do). The
    test holds the output folder's lock until both have written everything, so that both finish
    at the same moment, the worst case; whichever then wins, every file is its own."""
    from geo.atomic import folder_lock
    from pipeline.adapt import MapConfig, adapt

    labels = gpd.read_file(scene_files.labels)
    halves = {"first": ["Forest", "Shrubland", "Croplands"], "second": ["Urban/Built-up", "Water"]}
    assert set(labels["class"]) == {name for names in halves.values() for name in names}
    label_files = {}
    for name, classes in halves.items():
        label_files[name] = tmp_path / f"{name}.gpkg"
        labels[labels["class"].isin(classes)].to_file(label_files[name], driver="GPKG")
    maps = tmp_path / "maps"
    out = maps / "map.tif"
    outputs = {"probabilities": maps / "probabilities.tif", "vector": maps / "map.gpkg"}
    every = ["map.gpkg", "map.qml", "map.report.json", "map.report.md", "map.stac.json", "map.tif", "probabilities.tif"]
    failures: list[BaseException] = []

    def run(name: str) -> None:
        try:
            adapt(
                "pixel",
                scene_files.image,
                label_files[name],
                out,
                probabilities=outputs["probabilities"],
                vector=outputs["vector"],
                config=MapConfig(device="cpu", folds=2, spacing=0),
            )
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in halves]
    with folder_lock(maps):
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while any(len(temporaries(maps / name)) < 2 for name in every):  # both have written it all
            assert visible(maps) == []  # but nothing is in place while the lock is held
            assert not failures and time.monotonic() < deadline, (failures, sorted(os.listdir(maps)))
            time.sleep(0.01)
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert visible(maps) == every
    assert not [name for name in os.listdir(maps) if name.startswith(".")]  # no temporaries left

    # The report names the labels of the run that won; the map, probabilities and polygons must
    # be that run's (its classes only, and the map the argmax of the probabilities).
    report = json.loads(out.with_name("map.report.json").read_text())
    winner = next(name for name, path in label_files.items() if report["labels"] == str(path))
    item = json.loads(out.with_name("map.stac.json").read_text())
    assert item["properties"]["landcover:labels"] == str(label_files[winner])
    assert set(report["labels_per_class"]) == set(halves[winner])
    assert f"Labels: {label_files[winner]} " in out.with_name("map.report.md").read_text()
    ids = {DFC10.names.index(name) for name in halves[winner]}
    with rasterio.open(out) as src:
        classes = src.read(1)
    with rasterio.open(outputs["probabilities"]) as src:
        probabilities = src.read()
    mapped = classes != 255
    assert set(np.unique(classes[mapped])) == ids
    assert (np.argmax(np.nan_to_num(probabilities, nan=-1), axis=0)[mapped] == classes[mapped]).all()
    assert set(gpd.read_file(outputs["vector"])["class_id"]) == ids
