"""Atomic file output: a crash never leaves a half-written file that looks finished."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds.

    The temporary file lives in the same folder so the final `os.replace` is a same-filesystem
    rename, which is atomic. On any exception the temporary file is removed and nothing appears
    at `final_path`.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{final_path.name}.", suffix=".part" + final_path.suffix, dir=final_path.parent
    )
    os.close(handle)
    tmp_path = Path(tmp_name)
    tmp_path.unlink()  # writers (GDAL, pyarrow) create the file themselves
    try:
        yield tmp_path
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
