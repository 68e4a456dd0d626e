"""Where the per-file work runs: a Dask cluster, when asked for one.

Only ingest (mapped over source files) and prediction (mapped over scenes) go to Dask; training
and evaluation stay in the flow's process. Workers are processes, so a script that starts a
local cluster needs the `if __name__ == "__main__":` guard (the `landcover` command has one).
Workers read the inputs and write the outputs and the result cache themselves: on a remote
cluster those paths must be on a file system every worker sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect_dask import DaskTaskRunner


@contextlib.contextmanager
def dask_runner(address: str | None = None, workers: int | None = None) -> Iterator[DaskTaskRunner | None]:
    """A runner on the scheduler at `address`, or on a local cluster of `workers` processes that
    lives as long as the block; None (Prefect's thread pool) when neither is given.

    The local cluster is started here, not by each flow's runner, so the ingest and prediction
    flows of one run share it instead of each starting their own.

    Typing: prefect_dask's DaskTaskRunner subclasses the bare TaskRunner, which makes it a
    TaskRunner[PrefectConcurrentFuture] (the TypeVar's default), while `Flow.with_options` asks for
    the invariant TaskRunner[PrefectFuture[Any]]: passing this runner there needs an
    `ignore[arg-type]` (the library's typing, not a bug of the call).
    """
    if address is not None and workers is not None:
        raise ValueError("give a Dask scheduler address or a number of local workers, not both")
    if address is not None:
        yield DaskTaskRunner(address=address)
    elif workers is not None:
        from distributed import LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            yield DaskTaskRunner(address=cluster.scheduler_address)
    else:
        yield None
