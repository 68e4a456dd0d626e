"""Progress: the one way every long step of the project says how far it is.

- `progress_bar(total, desc, unit=...)` -> a tqdm bar (use it as a context manager, `update`,
  `set_postfix_str`). On a terminal (stderr is a TTY, or a notebook) it is tqdm's usual bar,
  redrawn in place. Anywhere else (CI logs, Prefect and Dask workers, `> log 2>&1`) it writes
  whole lines and never a carriage return:

      evaluate: 40/120 episodes (33%), 12.3 s elapsed, ~25 s left, maml fine-tuned at 5 shots

  one when the bar opens, one after the first unit of work (the first estimate of the time
  left), then at most one every `interval` seconds (`PROGRESS_INTERVAL`, or the environment's
  `LANDCOVER_PROGRESS_INTERVAL`), and the last one when it closes (also when an error ends it).
  So a log holds a bounded number of lines however many units there are.
- `phase(message)`: one line saying what a step is doing when it has no count to show.

`enabled=False` (the steps' `progress=False`) shows nothing. Timing is tqdm's own (`mininterval`
with `miniters=1`, its clock and its last-print time); `LogLines` only changes how a refresh is
written.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import IO

from tqdm import std as tqdm_std
from tqdm import tqdm

PROGRESS_INTERVAL = 10.0
"""Seconds between two progress lines when the output is not a terminal."""
INTERVAL_VARIABLE = "LANDCOVER_PROGRESS_INTERVAL"
"""Environment variable overriding `PROGRESS_INTERVAL` (seconds, >= 0)."""


def progress_interval() -> float:
    """`PROGRESS_INTERVAL`, or the seconds that `LANDCOVER_PROGRESS_INTERVAL` gives (a value that
    is not a number >= 0 is ignored: a progress setting never stops a run)."""
    given = os.environ.get(INTERVAL_VARIABLE, "").strip()
    with contextlib.suppress(ValueError):
        if given and math.isfinite(float(given)) and float(given) >= 0:
            return float(given)
    return PROGRESS_INTERVAL


def progress_bar(
    total: float | None,
    desc: str,
    *,
    unit: str = "it",
    enabled: bool = True,
    initial: int = 0,
    interval: float | None = None,
    file: IO[str] | None = None,
    clock: Callable[[], float] | None = None,
) -> tqdm:
    """A progress bar over `total` units (None: unknown) of the work `desc` names, written to
    `file` (default: stderr): a live bar on a terminal, plain lines (`LogLines`) anywhere else.
    `interval`: seconds between lines (default `progress_interval()`); `clock`: the time source
    of those lines (tests)."""
    if not enabled:
        return tqdm(total=total, desc=desc, disable=True)
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
    if file is None and _in_notebook():
        from tqdm.auto import tqdm as notebook_bar

        return notebook_bar(total=total, desc=desc, unit=unit, initial=initial)
    return LogLines(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        file=stream,
        interval=progress_interval() if interval is None else interval,
        clock=clock,
    )


def phase(message: str, *, enabled: bool = True, file: IO[str] | None = None) -> None:
    """One line saying what is being done (a phase with nothing to count), above any live bar."""
    if enabled:
        tqdm.write(message, file=file if file is not None else sys.stderr)


class LogLines(tqdm):
    """A tqdm bar for logs: each refresh tqdm makes is one whole line ending in a newline; it
    refreshes on the first `update`, then when `interval` seconds have passed since the last
    line (`mininterval`), and a last line comes when it closes. Postfix, description and
    `tqdm.write` refreshes are held to the same interval."""

    def __init__(
        self,
        total: float | None,
        desc: str,
        *,
        unit: str = "it",
        initial: int = 0,
        file: IO[str] | None = None,
        interval: float = PROGRESS_INTERVAL,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._closing = False
        # leave=False: tqdm's own closing writes no newline or carriage return; `close` writes
        # the last line itself
        super().__init__(
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            file=file if file is not None else sys.stderr,
            mininterval=interval,
            miniters=1,
            leave=False,
        )
        if self.disable:
            return
        if clock is not None:
            self._time = clock
            self.start_t = clock()
        # the first update is due at once: how long one unit takes is the first estimate
        self.last_print_t = self.start_t - interval

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        """Write the progress line, when a line is due; tqdm's other messages (the empty ones it
        clears a bar with) are dropped."""
        if msg is not None:
            return
        last_n = getattr(self, "_line_n", None)
        if hasattr(self, "last_print_t"):  # else: the bar is opening
            now = self._time()
            if last_n == self.n:
                return  # no news: a postfix or `tqdm.write` refresh, or the last line is there
            if not self._closing and now - self.last_print_t < self.mininterval:
                return
            self.last_print_t, self.last_print_n = now, self.n
        self._line_n = self.n
        self.fp.write(self.line() + "\n")
        self.fp.flush()

    def line(self) -> str:
        """`desc: n/total unit (pct%), elapsed, ~left, postfix` from tqdm's `format_dict`; the time
        left at the mean rate since the bar opened."""
        state = self.format_dict
        n, total, elapsed = state["n"], state["total"], state["elapsed"]
        done = n - state["initial"]
        unit = str(state["unit"]).strip()
        if total:
            text = f"{state['prefix']}: {_count(n)}/{_count(total)} {unit} ({100 * n / total:.0f}%)"
        else:
            text = f"{state['prefix']}: {_count(n)} {unit}"
        text += f", {_seconds(elapsed)} elapsed"
        if total and done > 0 and n < total:
            text += f", ~{_seconds(elapsed / done * (total - n))} left"
        if state["postfix"]:
            text += f", {state['postfix']}"
        return text

    def close(self) -> None:
        if not self.disable:
            self._closing = True
            self.refresh()
        super().close()

    def clear(self, nolock: bool = False) -> None:
        """Lines are never taken back (tqdm clears a live bar before `tqdm.write`)."""

    def moveto(self, n: int) -> None:
        """Lines have no position to move to."""


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """Whether tqdm would draw a notebook widget here (a Jupyter kernel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm import autonotebook

    return autonotebook.tqdm is not tqdm_std.tqdm


def _count(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"


def _seconds(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min {int(seconds % 60):02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
