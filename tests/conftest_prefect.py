"""Prefect for the flow tests: one private, temporary Prefect for the whole test session.

Loaded as a pytest plugin from `tests/conftest.py`. Prefect reads its settings when it is first
imported, so the environment is set in `pytest_configure`, before test modules import `flows`:
a temporary PREFECT_HOME (the user's profile, API URL and cached results are never touched) and
no analytics (there is no network). The ephemeral server starts once, on first use, because each
start costs about ten seconds (more on the first, which creates its database).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from uuid import UUID

import pytest

SERVER_STARTUP_TIMEOUT = 180
"""Seconds: on two busy cores the first start, which migrates SQLite, takes well over 30."""

_HOME = Path(tempfile.mkdtemp(prefix="landcover-prefect-home-"))


def pytest_configure(config: pytest.Config) -> None:
    os.environ["PREFECT_HOME"] = str(_HOME)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_PROFILES_PATH", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Flows in the session run against one temporary SQLite-backed Prefect server."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=SERVER_STARTUP_TIMEOUT):
        yield


@pytest.fixture
def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def task_states(flow_run_id: UUID | None, expected: Mapping[str, int]) -> dict[str, list[str]]:
    """Final state names of the task runs of a flow run and its subflows, by task name.

    Task runs reach the server as events, a little after the flow returns: poll until the
    `expected` number of runs of each task have a final state (or a minute has passed).
    `flow_run_id` is a state's `state_details.flow_run_id`, typed optional: None fails the test.
    """
    assert flow_run_id is not None, "the state belongs to no flow run"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            )
            ids = [flow_run_id, *(child.id for child in children)]
            subflows = {child.parent_task_run_id for child in children}  # not tasks of ours
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            states: dict[str, list[str]] = defaultdict(list)
            for run in runs:
                if run.id not in subflows and run.state is not None and run.state.is_final() and run.state.name:
                    states[run.name.rsplit("-", 1)[0]].append(run.state.name)
            arrived = all(len(states[name]) >= count for name, count in expected.items())
            if arrived or time.monotonic() > deadline:
                return dict(states)
            time.sleep(0.5)
