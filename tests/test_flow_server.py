"""`landcover serve` against a real `prefect server start`: the deployment and its cron schedule.

Both the server and the serving process are real subprocesses on the loopback interface, with
their own PREFECT_HOME; the test reads what they did through the Prefect client only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LANDCOVER_SERVER_TEST") != "1",
        reason="set LANDCOVER_SERVER_TEST=1: in the full suite `serve` hangs on Ctrl-C (open problem, "
        "see issue 10's note); alone, or with the other flow tests, it passes",
    ),
]

RUNNER_START_SECONDS = 15
"""Time for `serve` to go from printing its message to a running runner (5 s was too short on two
busy cores: Ctrl-C then came before the runner could pause the schedule)."""
CRON = "0 3 * * *"
STARTUP_SECONDS = 240
"""The first start of a server creates and migrates its SQLite database: slow on busy cores."""


def _until(check: Callable[[], Any], seconds: float, what: str, process: subprocess.Popen) -> Any:
    """Poll `check` until it returns something truthy; fail early if `process` died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: {process.args!r} exited with {process.returncode}")
        try:
            found = check()
        except Exception:  # not up yet: connection refused, 404, ...
            found = None
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"{what}: nothing after {seconds} s")


@contextlib.contextmanager
def _started(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A subprocess in a session of its own, stopped with Ctrl-C (then killed) when done."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def test_serve_puts_a_cron_deployment_on_a_real_server(tmp_path: Path, free_port: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = f"http://127.0.0.1:{free_port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
    }
    config = tmp_path / "flow.yaml"
    config.write_text(f"output: {tmp_path / 'out'}\nmethods: {{}}\nadapt: null\n")
    server_command = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port),
    ]
    serve_command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        "--cron",
        CRON,
        "--config",
        str(config),
        "--name",
        "nightly",
    ]
    with _started(server_command, env, tmp_path / "server.log") as server:
        _until(
            lambda: urllib.request.urlopen(f"{api}/health", timeout=5).status == 200,
            STARTUP_SECONDS,
            "server health",
            server,
        )
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            with _started(serve_command, env, tmp_path / "serve.log") as serving:
                deployment = _until(
                    lambda: client.read_deployment_by_name("landcover-end-to-end/nightly"),
                    120,
                    "deployment",
                    serving,
                )
                (schedule,) = deployment.schedules
                assert schedule.schedule.cron == CRON
                assert schedule.active
                assert not deployment.paused
                assert deployment.parameters["config"] == str(config.resolve())
                assert deployment.entrypoint == "flows.flows.end_to_end"
                # the deployment exists before the runner starts; only a started runner pauses
                # its schedule on Ctrl-C, so wait for it before stopping
                _until(
                    lambda: "being served" in (tmp_path / "serve.log").read_text(errors="replace"),
                    60,
                    "serving message",
                    serving,
                )
                time.sleep(RUNNER_START_SECONDS)
            # Ctrl-C stops serving and pauses the schedule, so no run starts without a runner.
            assert serving.returncode is not None
            assert client.read_deployment(deployment.id).paused
