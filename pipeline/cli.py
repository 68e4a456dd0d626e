"""The `landcover` command line: one thin command per pipeline step.

Every command calls the same function in `pipeline/` that the Prefect flows call. User mistakes
(`geo.errors.DataError`) print one line naming the file and exit with status 1.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from geo.errors import DataError

app = typer.Typer(
    help="Few-shot land-cover mapping: ingest, build regions, meta-train, evaluate, adapt, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Command = TypeVar("Command", bound=Callable[..., Any])


def reports_user_errors(command: Command) -> Command:
    """Turn a DataError into a one-line message on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DataError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


# --- commands (each a thin wrapper over a pipeline function) ---------------------------------


if __name__ == "__main__":
    sys.exit(app())
