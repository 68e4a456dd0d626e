"""Progress on long work (`geo.progress`): where stderr is not a terminal (CI, Prefect, a log
file) every bar is plain lines, never a carriage return, a bounded number of them (the first,
the one after the first unit, one per interval, the last), and the real steps name what they do:
picking the fine-tuning budget at the end of `train` and at the start of `evaluate` included.
No test here depends on how fast the machine is: a fake clock, an interval of 0, or one so long
that only the first, second and last lines come."""

from __future__ import annotations

import io
import itertools
import re
from pathlib import Path

import pytest
from tqdm import tqdm
from typer.testing import CliRunner

from geo.progress import INTERVAL_VARIABLE, PROGRESS_INTERVAL, LogLines, phase, progress_bar, progress_interval
from pipeline.cli import app

LINE = re.compile(
    r"^(?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>[\w ]+) \((?P<percent>\d+)%\), "
    r"(?P<elapsed>[\d.]+ s|\d+ min \d+ s|\d+ h \d+ min) elapsed(?:, ~[^,]+ left)?(?:, (?P<postfix>.*))?$"
)
"""One progress line: `desc: n/total unit (pct%), elapsed, ~left, postfix`."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines_of(text: str) -> list[str]:
    assert "\r" not in text, repr(text[:400])
    return text.splitlines()


def parsed(lines: list[str], desc: str) -> list[re.Match[str]]:
    """The progress lines of one bar, each checked against the line format."""
    found = [line for line in lines if line.startswith(f"{desc}: ")]
    matches = [LINE.match(line) for line in found]
    assert all(matches), found
    return [match for match in matches if match is not None]


# --- the helper alone -------------------------------------------------------------------------------


def test_lines_come_at_the_interval_with_the_first_and_the_last():
    """Every 3 s of fake time a unit is done; with a 10 s interval the lines are the opening one,
    the one after the first unit, then one per 10 s, and the last at the close."""
    out, clock = io.StringIO(), FakeClock()
    with progress_bar(20, "work", unit="items", file=out, interval=10, clock=clock) as bar:
        for _ in range(20):
            clock.now += 3
            bar.update()
            bar.set_postfix_str("busy", refresh=True)  # no line: nothing moved since the update's
    matches = parsed(lines_of(out.getvalue()), "work")
    assert [int(m["n"]) for m in matches] == [0, 1, 5, 9, 13, 17, 20]
    assert lines_of(out.getvalue())[0] == "work: 0/20 items (0%), 0.0 s elapsed"
    assert lines_of(out.getvalue())[1] == "work: 1/20 items (5%), 3.0 s elapsed, ~57.0 s left"
    assert lines_of(out.getvalue())[-1] == "work: 20/20 items (100%), 1 min 00 s elapsed, busy"
    elapsed = [3 * int(m["n"]) for m in matches]
    assert all(later - earlier >= 10 for earlier, later in itertools.pairwise(elapsed[1:-1]))


def test_many_quick_units_make_three_lines_and_interval_zero_one_per_unit():
    out = io.StringIO()
    with progress_bar(10_000, "quick", unit="files", file=out, interval=3600) as bar:
        for _ in range(10_000):
            bar.update()
    assert [int(m["n"]) for m in parsed(lines_of(out.getvalue()), "quick")] == [0, 1, 10_000]

    out = io.StringIO()
    with progress_bar(3, "each", unit="files", file=out, interval=0) as bar:
        for _ in range(3):
            bar.update()
    assert [int(m["n"]) for m in parsed(lines_of(out.getvalue()), "each")] == [0, 1, 2, 3]


def test_an_error_still_writes_the_last_line_and_a_phase_is_one_line():
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress_bar(10, "fails", unit="steps", file=out, interval=3600) as bar:
        bar.update(2)
        phase("fails: doing something without a count", file=out)
        bar.update(2)
        raise RuntimeError("stop")
    assert lines_of(out.getvalue()) == [
        "fails: 0/10 steps (0%), 0.0 s elapsed",
        "fails: 2/10 steps (20%), 0.0 s elapsed, ~0.0 s left",
        "fails: doing something without a count",
        "fails: 4/10 steps (40%), 0.0 s elapsed, ~0.0 s left",
    ]


def test_disabled_shows_nothing_and_a_terminal_gets_a_live_bar(monkeypatch: pytest.MonkeyPatch):
    out = io.StringIO()
    with progress_bar(5, "silent", file=out, enabled=False) as bar:
        bar.update(5)
    phase("silent: nothing", file=out, enabled=False)
    assert out.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with progress_bar(5, "live", file=Terminal()) as bar:
        assert isinstance(bar, tqdm) and not isinstance(bar, LogLines)
    with progress_bar(5, "logged", file=io.StringIO()) as bar:
        assert isinstance(bar, LogLines)


def test_the_interval_is_a_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(INTERVAL_VARIABLE, raising=False)
    assert progress_interval() == PROGRESS_INTERVAL
    monkeypatch.setenv(INTERVAL_VARIABLE, "60")
    assert progress_interval() == 60.0
    for ignored in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_VARIABLE, ignored)
        assert progress_interval() == PROGRESS_INTERVAL


# --- the real steps, their stderr not a terminal -----------------------------------------------------------


def test_evaluate_logs_plain_lines_with_the_budget_pick_named(
    split_index: Path, trained_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`landcover evaluate`: its episodes, the budget pick of random init (which rate and episode
    it scores) and the evaluation itself, three lines each at most with a long interval, however
    many steps they count."""
    monkeypatch.setenv(INTERVAL_VARIABLE, "3600")
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(split_index),
            "--runs",
            str(trained_runs["maml"]),
            "--shots",
            "0,1",
            "--episodes",
            "2",
            "--validation-episodes",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = lines_of(result.stderr)
    budget = parsed(lines, "pick budget random init")
    assert [int(m["n"]) for m in budget] == [0, 3, 200]  # 4 rates x 1 episode x 50 steps
    assert budget[1]["postfix"] == "lr 0.01, 5-shot episode 1/1" and budget[-1]["percent"] == "100"
    evaluation = parsed(lines, "evaluate")
    units = 4 * 2 * 2  # (maml fine-tuned, maml head, random init, pixel) x 2 shot counts x 2 episodes
    assert [int(m["n"]) for m in evaluation] == [0, 1, units]
    assert evaluation[1]["postfix"] == "maml fine-tuned, 0-shot"
    assert [int(m["n"]) for m in parsed(lines, "sample test episodes")] == [0, 1, 2]
    # nothing else comes per step: the lines above (and the val episodes') are all there is
    assert len([line for line in lines if LINE.match(line)]) == 3 * 4 - 1  # 1 val episode: 0, 1 (= the last)
    phases = [line.split(":")[0] for line in lines if LINE.match(line)]
    assert phases.index("pick budget random init") < phases.index("evaluate")


def test_train_logs_its_iterations_and_then_its_budget_pick(
    split_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`landcover train`: the end of training is the budget pick, which a MAML run scores at the
    fixed rates and then at its learned ones (a compact classification CNN: quick)."""
    monkeypatch.setenv(INTERVAL_VARIABLE, "3600")
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(split_index),
            "--task",
            "classification",
            "--method",
            "maml",
            *("--iterations", "2", "--validate-every", "2", "--checkpoint-every", "2"),
            *("--validation-episodes", "1", "--n-way", "4", "--shots", "2", "--queries", "3"),
            *("--device", "cpu", "--out", str(tmp_path / "run")),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = lines_of(result.stderr)
    assert [int(m["n"]) for m in parsed(lines, "train maml")] == [0, 1, 2]
    budget = parsed(lines, "pick budget maml")
    # 4 fixed rates and the learned ones x 1 episode at 1 and 5 shots x 25 steps
    assert [int(m["n"]) for m in budget] == [0, 3, 250]
    assert budget[1]["postfix"] == "lr 0.01, 1-shot episode 1/1"
    assert budget[-1]["postfix"] == "learned rates, 5-shot episode 1/1"
    phases = [line.split(":")[0] for line in lines if LINE.match(line)]
    assert phases.index("train maml") < phases.index("pick budget maml")
    assert len(phases) == 3 + 3 + 2  # and 1 validation episode: 0, then 1 (the last)
