"""Atomic file output: a crash never leaves a half-written file that looks finished.

- `atomic_output(path)`: write into a temporary file beside `path`, renamed onto it only when
  the block succeeds; removed otherwise.
- `output_group()`: every `atomic_output` inside the block (in this thread) is only staged,
  and all of them are renamed into place together when the block succeeds, under an exclusive
  lock on their folders: a map, its style, reports and probabilities always come from one run,
  even when two runs write the same outputs at the same time (`pipeline.adapt`). `pending(path)`
  is where a staged output can be read back before then.
- `folder_lock(folder)`: an exclusive `flock` on a folder, for writers that must not interleave.
- A full disk (or quota) while writing is a `DataError` naming the folder ("no space left on
  device while writing NAME"), whatever the writer (GDAL, pyarrow, torch) made of it, and the
  temporary file is removed: only the previous file, if any, is left.

Temporary files are hidden and named `.NAME.<pid>@<host>.<random>.part<suffix>` (scratch files of
a writer: `...staging<suffix>`). A process killed with SIGKILL cannot remove its own; the next
write of NAME in that folder removes those whose process (on this host) is gone. A temporary of a
live process, or of another host, is never touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from geo.errors import DataError

try:
    import fcntl
except ImportError:  # not POSIX: no locks (the renames stay atomic one by one)
    HAS_FLOCK = False
else:
    HAS_FLOCK = True

FULL_BELOW = 2**20
"""Bytes: a write that fails while its folder has less than this free failed for want of space.
(GDAL and torch report a full disk as a generic write error; a writer that fills the disk leaves
less than one block free.)"""

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_TEMPORARY = re.compile(r"\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.(?:part|staging|tmp)")
"""What follows `.NAME` in the name of a temporary file of ours."""


@contextlib.contextmanager
def atomic_output(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds.

    The temporary file lives in the same folder so the final `os.replace` is a same-filesystem
    rename, which is atomic. On any exception the temporary file is removed and nothing appears
    at `final_path`. Inside `output_group`, the rename waits for the group's end.
    """
    final_path = Path(final_path)
    group = _GROUP.get()
    with _temporary(final_path, "part") as tmp_path:
        yield tmp_path
        if group is not None:
            group.stage(tmp_path, final_path)
        else:
            os.replace(tmp_path, final_path)


@contextlib.contextmanager
def scratch_file(beside: str | Path, suffix: str = "") -> Iterator[Path]:
    """A hidden scratch file in `beside`'s folder (same disk, not a small /tmp), always removed;
    a full disk while it is written is a DataError naming the folder."""
    with _temporary(Path(beside), "staging", suffix) as path:
        yield path


@contextlib.contextmanager
def _temporary(final_path: Path, kind: str, suffix: str | None = None) -> Iterator[Path]:
    """A unique temporary path beside `final_path` (not created: writers such as GDAL and pyarrow
    create the file themselves), removed at the end unless it was renamed or staged."""
    folder = final_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final_path)
    handle, name = tempfile.mkstemp(
        prefix=f".{final_path.name}.{os.getpid()}@{_HOST}.",
        suffix=f".{kind}{final_path.suffix if suffix is None else suffix}",
        dir=folder,
    )
    os.close(handle)
    path = Path(name)
    path.unlink()
    try:
        yield path
    except Exception as error:
        if not isinstance(error, DataError) and _disk_full(folder, error):
            raise DataError(folder, f"no space left on device while writing {final_path.name}") from error
        raise
    finally:
        group = _GROUP.get()
        if group is None or not group.holds(path):
            path.unlink(missing_ok=True)


def _disk_full(folder: Path, error: BaseException) -> bool:
    """Whether `error`, raised while writing into `folder`, comes from a full disk or quota."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < FULL_BELOW


def _remove_stale_temporaries(final_path: Path) -> None:
    """Remove the temporary files of `final_path` left by processes of this host that are gone
    (killed before they could clean up)."""
    prefix = f".{final_path.name}"
    try:
        names = [name for name in os.listdir(final_path.parent) if name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.match(name, len(prefix))
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(final_path.parent / name)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


# --- several outputs that appear together ---------------------------------------------------


class _Group:
    """Outputs staged by `atomic_output` inside `output_group`: final path -> temporary file."""

    def __init__(self) -> None:
        self.staged: dict[Path, Path] = {}
        self.removed: set[Path] = set()
        """Outputs of an earlier run that this group's outputs make stale (see `remove_output`)."""

    def stage(self, temporary: Path, final: Path) -> None:
        key = Path(os.path.abspath(final))
        earlier = self.staged.pop(key, None)
        if earlier is not None:
            earlier.unlink(missing_ok=True)
        self.removed.discard(key)
        self.staged[key] = temporary

    def holds(self, temporary: Path) -> bool:
        return temporary in self.staged.values()

    def commit(self) -> None:
        """Rename every staged file into place, all under the locks of their folders."""
        try:
            with contextlib.ExitStack() as locks:
                for folder in sorted({final.parent for final in [*self.staged, *self.removed]}):
                    locks.enter_context(folder_lock(folder))
                for final, temporary in list(self.staged.items()):
                    os.replace(temporary, final)
                    del self.staged[final]
                for stale in self.removed:
                    stale.unlink(missing_ok=True)
        finally:
            self.discard()

    def discard(self) -> None:
        for temporary in self.staged.values():
            temporary.unlink(missing_ok=True)
        self.staged.clear()


_GROUP: contextvars.ContextVar[_Group | None] = contextvars.ContextVar("landcover_output_group", default=None)


@contextlib.contextmanager
def output_group() -> Iterator[None]:
    """Outputs written with `atomic_output` in this block (in this thread) appear together at its
    end, or none of them when it fails.

    They are written to temporary files as usual; at the end of the block every one is renamed
    into place while an exclusive lock is held on each folder involved, so two processes (or
    threads) writing the same outputs never leave a mix: the last to finish wins them all. Read a
    staged output back with `pending(path)`. A group inside a group joins the outer one.
    """
    if _GROUP.get() is not None:
        yield
        return
    group = _Group()
    token = _GROUP.set(group)
    try:
        yield
    except BaseException:
        group.discard()
        raise
    finally:
        _GROUP.reset(token)
    group.commit()


def remove_output(path: str | Path) -> None:
    """Remove an output of an earlier run that the outputs being written make stale (e.g. the
    report of a map that is being replaced): at the group's commit, under its locks, unless the
    group writes `path` itself; at once outside a group."""
    group = _GROUP.get()
    if group is None:
        Path(path).unlink(missing_ok=True)
    else:
        group.removed.add(Path(os.path.abspath(path)))


def pending(path: str | Path) -> Path:
    """Where the output `path` can be read now: its staged temporary file inside `output_group`,
    else `path` itself."""
    group = _GROUP.get()
    if group is None:
        return Path(path)
    return group.staged.get(Path(os.path.abspath(path)), Path(path))


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """An exclusive `flock` on `folder` (created when missing) for the block; it blocks until
    every other holder, in any process or thread, has left. The kernel releases it when its
    holder dies, so a killed run never leaves a folder locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not HAS_FLOCK:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def check_output_file(path: str | Path, option: str) -> None:
    """DataError before any work when `path` cannot become a file: a folder is there, or the
    folder it would go in is a file or not writable (read-only mount, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, f"is a folder; {option} needs a file name")
    _check_writable_parent(path, option)


def check_output_folder(path: str | Path, option: str) -> None:
    """DataError before any work when `path` cannot become (or be written in as) a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(path, f"is a file; {option} needs a folder")
    _check_writable_parent(path / "_", option)


def _check_writable_parent(path: Path, option: str) -> None:
    """The nearest existing folder above `path` must be a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(parent, f"is a file, not a folder; {option} cannot be written inside it")
    if not os.access(parent, os.W_OK):
        raise DataError(parent, f"is not writable (read-only or no permission); {option} cannot be written there")
