"""The one exception type for problems with the user's data."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A file the user gave us is missing, unreadable or not what it should be.

    The CLI prints `str(error)` — which always starts with the file — and exits non-zero,
    so a user mistake never shows as a traceback.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
