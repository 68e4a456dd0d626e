"""The CLI's choice options: each lists what the pipeline takes (written out, so that importing the
CLI imports none of the pipeline), shows the choices in --help and refuses any other value with them."""

from __future__ import annotations

import enum
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geo.sample_data import DIFFICULTIES, KINDS
from models.learner_names import LEARNER_NAMES
from models.learners import LEARNERS
from pipeline import cli, protocol, regions
from pipeline.train import TrainConfig

runner = CliRunner(env={"COLUMNS": "250"})  # at 80 columns rich breaks a help table's choices mid-word

ALL_LEARNERS = "'protonet', 'reptile', 'anil', 'metasgd', 'mamlpp', 'maml-ga', 'maml', 'fomaml', 'r2d2', 'pretrain'"


def _values(choice: type[enum.Enum]) -> tuple[str, ...]:
    return tuple(member.value for member in choice)


def test_the_learner_registry_holds_the_names_the_cli_lists() -> None:
    assert tuple(LEARNERS) == LEARNER_NAMES == _values(cli.Method)


@pytest.mark.parametrize(
    ("choice", "names"),
    [
        (cli.SampleKind, KINDS),
        (cli.Difficulty, tuple(DIFFICULTIES)),
        (cli.RegionMethod, typing.get_args(regions.RegionMethod)),
        (cli.Task, typing.get_args(protocol.Task)),
        (cli.Size, typing.get_args(typing.get_type_hints(TrainConfig)["size"])),
        (cli.Protocol, typing.get_args(protocol.Protocol)),
    ],
)
def test_each_choice_is_what_the_pipeline_takes(choice: type[enum.Enum], names: tuple[str, ...]) -> None:
    assert sorted(_values(choice)) == sorted(names)


def test_importing_the_cli_imports_no_torch() -> None:
    check = "import sys, pipeline.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], timeout=60).returncode == 0


@pytest.mark.parametrize(
    ("command", "option", "choices"),
    [
        ("train", "--method", "protonet|reptile|anil|metasgd|mamlpp|maml-ga|maml|fomaml|r2d2|pretrain"),
        ("train", "--task", "classification|segmentation"),
        ("train", "--size", "tiny|base"),
        ("train", "--device", "auto|cpu|cuda"),
        ("evaluate", "--protocol", "scene|episode"),
        ("predict", "--device", "auto|cpu|cuda"),
        ("sample-data", "--kind", "sen12ms|deepglobe|eurosat|scene"),
        ("sample-data", "--difficulty", "default|hard"),
        ("regions", "--by", "metadata|kmeans"),
    ],
)
def test_help_lists_the_choices(command: str, option: str, choices: str) -> None:
    result = runner.invoke(cli.app, [command, "--help"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if f" {option} " in line]
    assert f"<{choices}>" in line


@pytest.mark.parametrize(
    ("args", "option", "allowed"),
    [
        (["train", "index.parquet", "--method", "siamese", "--out", "run"], "--method", ALL_LEARNERS),
        (["train", "index.parquet", "--device", "tpu", "--out", "run"], "--device", "'auto', 'cpu', 'cuda'"),
        (
            ["predict", "--model", "run", "--image", "s.tif", "--out", "m.tif", "--device", "mps"],
            "--device",
            "'auto', 'cpu', 'cuda'",
        ),
        (
            ["evaluate", "index.parquet", "--runs", "run", "--protocol", "tiles", "--out", "r"],
            "--protocol",
            "'scene', 'episode'",
        ),
        (["sample-data", "data", "--kind", "landsat"], "--kind", "'sen12ms', 'deepglobe', 'eurosat', 'scene'"),
    ],
)
def test_a_value_outside_the_choices_exits_2_naming_them(
    args: list[str], option: str, allowed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert f"is not one of {allowed}." in result.output
    assert not any(tmp_path.iterdir())
