"""The ingest flow on a real local Dask cluster of two worker processes.

The index must be the very one the in-process `landcover ingest` writes, and the per-file tasks
must really have been spread over both workers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from distributed import Client, get_task_stream

from flows.dask import dask_runner
from flows.flows import ingest_flow
from geo.index import read_index
from tests.conftest_prefect import task_states

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_ingest_on_two_dask_workers_writes_the_in_process_index(
    sen12ms_root: Path, sen12ms_index: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dask.parquet"
    with dask_runner(workers=2) as runner:
        assert runner is not None
        with Client(runner.address) as client, get_task_stream(client) as stream:
            state = ingest_flow.with_options(
                task_runner=runner,  # type: ignore[arg-type]  # prefect_dask's typing: see flows.dask
                result_storage=tmp_path / "cache",
            )("sen12ms", sen12ms_root, out, files_per_task=64, return_state=True)
    assert state.result() == out
    assert len({task["worker"] for task in stream.data}) == 2
    # the workers report their task runs to the flow's Prefect server, not to one of their own
    parts = task_states(state.state_details.flow_run_id, {"index-part": 8})["index-part"]
    assert parts == ["Completed"] * 8  # 512 files, 64 per task
    expected_frame, expected_metadata = read_index(sen12ms_index)
    frame, metadata = read_index(out)
    pd.testing.assert_frame_equal(frame, expected_frame)
    assert metadata == expected_metadata


def test_two_workers_and_an_address_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"), dask_runner("tcp://127.0.0.1:8786", 2):
        pass
