"""Evaluation: `landcover evaluate` scores every run (fine-tuned and with a closed-form head),
random init and the per-pixel classifier on the same seeded test episodes and writes results.csv,
report.md and the accuracy plot; the same seed gives the same table; bad inputs end with one
clear line. The classification task (compact CNN) trains and
evaluates end to end too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.candidates import PIXEL
from pipeline.cli import app
from pipeline.evaluate import RANDOM_INIT, EvaluateConfig
from pipeline.report import COSTS, METRICS

runner = CliRunner()

TINY_EVALUATION = [
    "--shots",
    "0,1,2",
    "--episodes",
    "2",
    "--validation-episodes",
    "1",
    "--seed",
    "0",
    "--device",
    "cpu",
]
PNG = b"\x89PNG\r\n\x1a\n"


def flat(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def check_report(out: Path, methods: list[str], shots: list[int], *, segmentation: bool) -> pd.DataFrame:
    """The three report files, one results row per (candidate, shots): each run fine-tuned and with
    its head, then random init and the pixel classifier, always present."""
    results = pd.read_csv(out / "results.csv")
    bounds = [f"{metric}_{side}" for metric in METRICS for side in ("low", "high")]
    assert {"method", "shots", *METRICS, *bounds} <= set(results.columns)
    candidates = [f"{m} {variant}" for m in methods for variant in ("fine-tuned", "head")] + [RANDOM_INIT, PIXEL]
    assert list(zip(results["method"], results["shots"])) == [(m, s) for m in candidates for s in shots]
    scored = ["accuracy", "kappa", "f1", *(["miou"] if segmentation else [])]
    assert results[scored].notna().all().all() and results["accuracy"].between(0, 1).all()
    assert results["miou"].isna().all() != segmentation
    assert (results["accuracy_low"] <= results["accuracy"]).all()
    assert (results["accuracy"] <= results["accuracy_high"]).all()
    report = (out / "report.md").read_text()
    assert "| method | 0 shot | 1 | 2 |" in report
    for method in candidates:
        assert f"| {method} | " in report
    assert (out / "accuracy_vs_shots.png").read_bytes().startswith(PNG)
    return results


def test_evaluate_writes_the_report_and_the_same_seed_gives_the_same_table(split_index, trained_runs, tmp_path):
    pretrain, maml = str(trained_runs["pretrain"]), str(trained_runs["maml"])
    first = runner.invoke(
        app, ["evaluate", str(split_index), "--runs", pretrain, maml, *TINY_EVALUATION, "--out", str(tmp_path / "a")]
    )
    assert first.exit_code == 0, first.output
    results = check_report(tmp_path / "a", ["pretrain", "maml"], [0, 1, 2], segmentation=True)
    assert (results["episodes"] == 2).all()
    assert "| random init |" in first.stdout and str(tmp_path / "a" / "results.csv") in first.stdout

    assert (results["adapt_seconds"] > 0).all()  # the cost columns: measured adapt time per episode
    per_iteration = results.set_index("method")["train_seconds_per_iteration"]
    assert per_iteration["maml fine-tuned"].min() > 0 and per_iteration["pixel"].isna().all()
    assert "train s/iteration | adapt s/episode |" in first.stdout

    # the other spelling of several runs, the same seed: the same scores (timings differ)
    second = runner.invoke(
        app,
        [
            "evaluate",
            str(split_index),
            "--runs",
            pretrain,
            "--runs",
            maml,
            *TINY_EVALUATION,
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert second.exit_code == 0, second.output
    scores = [pd.read_csv(tmp_path / run / "results.csv").drop(columns=list(COSTS)) for run in ("a", "b")]
    scores_a, scores_b = scores
    pd.testing.assert_frame_equal(scores_a, scores_b, check_exact=True)
    reports = [(tmp_path / run / "report.md").read_text().split("kappa:")[1] for run in ("a", "b")]
    assert reports[0] == reports[1]


def test_protonet_is_scored_by_its_prototypes_without_fine_tuning(split_index, trained_runs, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        ["evaluate", str(split_index), "--runs", str(trained_runs["protonet"]), *TINY_EVALUATION, "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    methods = pd.read_csv(out / "results.csv")["method"].unique().tolist()
    assert methods == ["protonet prototypes", "protonet head", RANDOM_INIT, PIXEL]
    assert "protonet prototypes: kind nearest class prototype" in flat((out / "report.md").read_text())


def test_evaluate_refuses_bad_inputs_with_one_line(split_index, sen12ms_index, trained_runs, tmp_path):
    out = tmp_path / "report"
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    result = runner.invoke(app, ["evaluate", str(split_index), "--runs", str(not_a_run), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert flat(result.stderr) == f"error: {not_a_run}: is not a run directory (no config.json and weights.pt)"

    no_splits = runner.invoke(
        app, ["evaluate", str(sen12ms_index), "--runs", str(trained_runs["maml"]), "--out", str(out)]
    )
    assert no_splits.exit_code == 1 and "Traceback" not in no_splits.output
    assert flat(no_splits.stderr).startswith(f"error: {sen12ms_index}: the index has no regions/splits yet")

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("weights.pt", "config.json"):
        (unfinished / name).write_bytes((trained_runs["maml"] / name).read_bytes())
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "finetune_steps": None}))
    result = runner.invoke(app, ["evaluate", str(split_index), "--runs", str(unfinished), "--out", str(out)])
    assert result.exit_code == 1 and f"{unfinished}: has no fine-tuning budget" in flat(result.stderr)

    for shots in ("1,x", "-1,2", ","):
        usage = runner.invoke(
            app,
            ["evaluate", str(split_index), "--runs", str(trained_runs["maml"]), "--shots", shots, "--out", str(out)],
        )
        assert usage.exit_code == 2 and "--shots" in flat(usage.output), shots
    missing = runner.invoke(app, ["evaluate", str(split_index), "--out", str(out)])
    assert missing.exit_code == 2 and "--runs" in flat(missing.output)
    assert not out.exists()


def test_evaluation_settings_are_checked_and_shots_sorted():
    assert EvaluateConfig(shots=(5, 0, 1, 1)).shots == (0, 1, 5)
    with pytest.raises(ValueError, match="shots"):
        EvaluateConfig(shots=())
    with pytest.raises(ValueError, match="episodes must be at least 1"):
        EvaluateConfig(episodes=0)


def test_classification_trains_a_compact_cnn_and_evaluates(split_index, tmp_path):
    """4-way tile classification: the sample regions hold 10-19 tiles per class, so few queries."""
    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "train",
            str(split_index),
            "--task",
            "classification",
            "--method",
            "maml",
            "--iterations",
            "4",
            "--validate-every",
            "2",
            "--checkpoint-every",
            "2",
            "--validation-episodes",
            "1",
            "--n-way",
            "4",
            "--shots",
            "2",
            "--queries",
            "3",
            "--device",
            "cpu",
            "--out",
            str(run),
        ],
    )
    assert trained.exit_code == 0, trained.output
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "classification" and config["arch"]["name"] == "cnn"
    assert config["settings"]["shape"] == {"n_way": 4, "k_shot": 2, "q_queries": 3, "query_tiles": 2}

    out = tmp_path / "report"
    evaluated = runner.invoke(
        app, ["evaluate", str(split_index), "--runs", str(run), *TINY_EVALUATION, "--queries", "3", "--out", str(out)]
    )
    assert evaluated.exit_code == 0, evaluated.output
    results = check_report(out, ["maml"], [0, 1, 2], segmentation=False)
    # 4-way with 3 queries per class: 1/12 steps per episode, 1/24 in a mean of two (CSV: 6 digits)
    twenty_fourths = results["accuracy"] * 24
    assert ((twenty_fourths - twenty_fourths.round()).abs() < 1e-4).all()


def test_segmentation_evaluates_on_scene_episodes_by_default_and_refuses_an_unknown_protocol(
    split_index, trained_runs, tmp_path
):
    """Scene episodes label every class of a scene: with 1 shot per class the query holds far more
    classes than an N-way episode would allow, and the report names the protocol."""
    maml = str(trained_runs["maml"])
    scene = runner.invoke(
        app, ["evaluate", str(split_index), "--runs", maml, *TINY_EVALUATION, "--out", str(tmp_path / "s")]
    )
    assert scene.exit_code == 0, scene.output
    assert "scene protocol" in (tmp_path / "s" / "report.md").read_text()
    episode = runner.invoke(
        app,
        [
            "evaluate",
            str(split_index),
            "--runs",
            maml,
            *TINY_EVALUATION,
            "--protocol",
            "episode",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert episode.exit_code == 0, episode.output
    assert "episode protocol" in (tmp_path / "e" / "report.md").read_text()
    bad = runner.invoke(
        app, ["evaluate", str(split_index), "--runs", maml, "--protocol", "tiles", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 2 and "--protocol" in flat(bad.output) and not (tmp_path / "b").exists()
