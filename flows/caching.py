"""Cache keys from what a step reads: file fingerprints and plain settings, never tensors.

A re-run skips a step when the task's code, its settings and the files it reads are unchanged,
in any process: results are persisted beside the outputs (`result_storage`). Files are
fingerprinted by size and modification time, not content (a SEN12MS release is tens of GB and is
only ever stat-ed here); a folder by every file below it. Paths a step *writes* are keyed by name
only, or a step would never match its own earlier run. Anything that is not a path or a plain
value (a tensor, a model, a data frame) is refused, because Prefect's own hash of such objects
differs in every process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

CACHE_FOLDER = ".prefect-cache"
"""Below the run's output folder: delete the outputs and the cache goes with them."""

Fingerprint = list[tuple[str, int, int]]


def fingerprint(path: Path) -> Fingerprint:
    """(relative name, size, mtime_ns) of a file or of every file below a folder; [] if missing."""
    if path.is_file():
        stat = path.stat()
        return [("", stat.st_size, stat.st_mtime_ns)]
    found: Fingerprint = []
    for folder, _, names in os.walk(path):
        for name in names:
            file = Path(folder, name)
            stat = file.stat()
            found.append((str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


@dataclass
class FileInputs(CachePolicy):
    """Key = task inputs, with every `Path` read replaced by its fingerprint."""

    writes: tuple[str, ...] = ()
    """Arguments naming files or folders the task writes: keyed by path, not by content."""
    ignore: tuple[str, ...] = ()
    """Arguments left out of the key (values already determined by the other arguments)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        key = {
            name: _plain(value, name, written=name in self.writes)
            for name, value in inputs.items()
            if name not in self.ignore
        }
        return hash_objects(key, raise_on_failure=True)


def cache_on(*, writes: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> CachePolicy:
    """The task's source plus its file-fingerprinted inputs; no run id, so runs share results."""
    return FileInputs(writes=writes, ignore=ignore) + TASK_SOURCE


def _plain(value: Any, name: str, *, written: bool) -> Any:
    if isinstance(value, Path):
        return str(value) if written else [str(value), fingerprint(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return [type(value).__qualname__, _plain(fields, name, written=written)]
    if isinstance(value, Mapping):
        return {str(key): _plain(item, name, written=written) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, name, written=written) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"argument {name!r}: a cache key takes paths and plain settings, not {type(value).__name__}")
