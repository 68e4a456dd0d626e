"""Training: a killed run resumes to the weights of an uninterrupted one, a run directory with
other settings is refused, FOMAML records that it is first order, and a run directory holds
what `evaluate` and `adapt` need (weights that load with `weights_only=True`, a config.json
with classes, bands, normalisation, architecture and fine-tuning budget)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from geo.classes import IGNORE_INDEX
from geo.sample_data import write_sen12ms
from models.checkpoint import load_run
from models.learners import LEARNERS
from pipeline.adapt import MapConfig
from pipeline.cli import app
from pipeline.ingest import ingest
from pipeline.protocol import SCENE_FINETUNE_STEPS, load_split_index
from pipeline.regions import build_regions
from pipeline.train import TrainConfig, _Trainer, train, validation_episodes

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

RESUMABLE = [
    "--method",
    "fomaml",
    "--iterations",
    "8",
    "--validate-every",
    "4",
    "--checkpoint-every",
    "3",
    "--validation-episodes",
    "1",
    "--seed",
    "0",
    "--device",
    "cpu",
]
"""Tiny FOMAML settings: checkpoints at 3, 6, 8 and validations at 4, 8, so a kill after the
first checkpoint usually resumes from behind the best weights already saved."""


def flat(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def start_training(index: Path, out: Path, log: Path) -> subprocess.Popen:
    """`landcover train` in its own process, as a user starts it (one thread, like the others)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipeline.cli", "train", str(index), *RESUMABLE, "--out", str(out)]
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended (status {process.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


def saved_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "weights.pt", map_location="cpu", weights_only=True)


def test_a_killed_training_resumes_and_ends_with_the_weights_of_an_uninterrupted_run(split_index, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    uninterrupted = start_training(split_index, whole, tmp_path / "whole.log")  # alongside, same settings
    first = start_training(split_index, killed, tmp_path / "killed.log")
    try:
        wait_for(killed / "train_state.pt", first)
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        first.kill()
    reached = int(torch.load(killed / "train_state.pt", weights_only=True)["iteration"])
    assert 3 <= reached <= 8, "the kill should land after the first checkpoint"
    assert json.loads((killed / "config.json").read_text())["finetune_steps"] is None  # unfinished

    again = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", str(split_index), *RESUMABLE, "--out", str(killed)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from iteration {reached}" in again.stdout
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-2000:]

    resumed, reference = saved_weights(killed), saved_weights(whole)
    assert resumed["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert resumed["inner_lrs"].keys() == reference["inner_lrs"].keys() and reference["inner_lrs"]
    for name, rate in reference["inner_lrs"].items():
        assert torch.equal(resumed["inner_lrs"][name], rate), name
    config, expected = (json.loads((run / "config.json").read_text()) for run in (killed, whole))
    timings = [config.pop("seconds_per_iteration"), expected.pop("seconds_per_iteration")]
    assert config == expected and min(timings) > 0  # budget, best iteration, ...; timings differ
    # FOMAML says so in its config
    assert config["method"] == "fomaml" and config["first_order"] is True
    assert config["finetune_steps"] is not None and config["settings"]["method"] == "fomaml"

    # the finished run is a run directory of another seed's settings: refused, nothing touched
    before = {path.name: path.stat().st_mtime_ns for path in killed.iterdir()}
    other = [*RESUMABLE[:-4], "--seed", "1", "--device", "cpu"]
    refused = runner.invoke(app, ["train", str(split_index), *other, "--out", str(killed)])
    assert refused.exit_code == 1
    message = flat(refused.stderr)
    assert message.startswith(f"error: {killed}: holds a run with other settings")
    assert "seed: 0 there, 1 now" in message and "Traceback" not in refused.output
    assert {path.name: path.stat().st_mtime_ns for path in killed.iterdir()} == before


def test_a_run_directory_holds_weights_only_checkpoints_and_a_complete_config(trained_runs):
    for name, run_dir in trained_runs.items():
        weights = torch.load(run_dir / "weights.pt", map_location="cpu", weights_only=True)
        state = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
        assert set(weights) == {"model", "inner_lrs"} and state["iteration"] > 0
        config = json.loads((run_dir / "config.json").read_text())
        assert config["method"] == name and config["task"] == "segmentation"
        assert len(config["class_names"]) == len(config["class_colors"]) == config["arch"]["num_classes"]
        assert len(config["bands"]) == config["arch"]["in_channels"] == len(config["arch"]["input_mean"])
        assert config["normalisation"]["divide"] == 10000
        assert config["arch"]["name"] == "unet" and config["first_order"] is False
        if name not in ("r2d2", "protonet"):
            assert config["finetune_steps"] in SCENE_FINETUNE_STEPS  # picked on validation scene episodes
        assert config["seconds_per_iteration"] > 0
        run = load_run(run_dir)
        assert all(torch.equal(run.model.state_dict()[key], value) for key, value in weights["model"].items())
    maml = json.loads((trained_runs["maml"] / "config.json").read_text())
    assert maml["inner_steps"] == 3 and maml["learn_inner_lr"] is True
    assert maml["settings"]["init_from"] == str(trained_runs["pretrain"])
    assert saved_weights(trained_runs["maml"])["inner_lrs"]  # learned rates travel with the weights
    assert not saved_weights(trained_runs["pretrain"])["inner_lrs"]
    r2d2 = json.loads((trained_runs["r2d2"] / "config.json").read_text())
    assert r2d2["head_penalty"] > 0 and r2d2["head_scale"] > 0 and r2d2["inner_steps"] is None
    assert r2d2["finetune_steps"] == 0  # adapts through its head: no fine-tuning budget
    protonet = json.loads((trained_runs["protonet"] / "config.json").read_text())
    assert protonet["finetune_steps"] == 0 and protonet["inner_steps"] is None  # prototypes: no budget
    assert maml["head_penalty"] is None  # only a run meta-trained through a ridge head has one
    # finetune_lr None means "fine-tune at the learned rates", which only MAML has
    assert json.loads((trained_runs["pretrain"] / "config.json").read_text())["finetune_lr"] is not None


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"method": "siamese"}, "method: 'siamese' is not one of protonet, reptile"),
        ({"validate_every": 0}, "validate_every must be at least 1"),
        ({"inner_lr": 0.0}, "must be positive"),
        ({"crop": 100}, r"crop must be a multiple of 8 px \(the tiny U-Net halves its input 3 times\), got 100"),
        ({"size": "base", "crop": 48}, "crop must be a multiple of 32 px"),
        ({"support_window": 4}, "support_window must be a multiple of 8 px"),
    ],
)
def test_impossible_training_settings_are_refused_at_once(settings, problem):
    with pytest.raises(ValueError, match=problem):
        TrainConfig(**settings)


def test_the_train_command_turns_bad_options_into_usage_errors(split_index, tmp_path):
    bad_method = runner.invoke(app, ["train", str(split_index), "--method", "siamese", "--out", str(tmp_path / "r")])
    assert bad_method.exit_code == 2
    learners = "'protonet', 'reptile', 'anil', 'metasgd', 'mamlpp', 'maml-ga', 'maml', 'fomaml', 'r2d2', 'pretrain'"
    assert f"not one of {learners}" in flat(bad_method.output)
    zero = runner.invoke(app, ["train", str(split_index), "--checkpoint-every", "0", "--out", str(tmp_path / "r")])
    assert zero.exit_code == 2
    odd_crop = runner.invoke(app, ["train", str(split_index), "--crop", "20", "--out", str(tmp_path / "r")])
    assert odd_crop.exit_code == 2 and "crop must be a multiple of 8 px" in flat(odd_crop.output)
    assert not (tmp_path / "r").exists()


def test_training_on_crops_of_larger_patches_runs_on_windows_and_records_the_crop(tmp_path):
    root = write_sen12ms(tmp_path / "sen12ms", seed=0, regions=3, size=64, patches_per_region=9)
    index = ingest("sen12ms", root, tmp_path / "index.parquet", progress=False).out
    split = build_regions(index, tmp_path / "split.parquet", by="metadata", seed=0).index_path
    windows = {"crop": 32, "support_window": 16}

    def cropped(method: str, init_from: str | None = None) -> TrainConfig:
        return TrainConfig(
            method=method,
            iterations=4,
            validate_every=2,
            validation_episodes=1,  # the budget pick at the end takes most of the time
            checkpoint_every=2,
            init_from=init_from,
            crop=32,
            support_window=16,
        )

    pretraining = cropped("pretrain")
    pretrain = train(split, tmp_path / "pretrain", pretraining, progress=False)
    config = cropped("maml", init_from=str(pretrain.run_dir))
    maml = train(split, tmp_path / "maml", config, progress=False)
    for run in (pretrain, maml):
        recorded = json.loads((run.run_dir / "config.json").read_text())
        assert {key: recorded["settings"][key] for key in windows} == windows
        assert recorded["finetune_steps"] is not None and load_run(run.run_dir).config.settings["crop"] == 32

    # what the learners were fed: windows, from seeded draws (a resumed run sees the same)
    data = load_split_index(split)
    model = load_run(pretrain.run_dir).model
    batches = [_Trainer(LEARNERS["pretrain"](model, pretraining.learner_settings()), data, pretraining).tiles(3)]
    batches.append(_Trainer(LEARNERS["pretrain"](model, pretraining.learner_settings()), data, pretraining).tiles(3))
    (images, labels), (again, _) = batches
    assert images.shape == (16, 13, 32, 32) and labels.shape == (16, 32, 32) and np.array_equal(images, again)
    assert (labels != IGNORE_INDEX).any(axis=(1, 2)).all()
    trainer = _Trainer(LEARNERS["maml"](model, config.learner_settings()), data, config)
    for episode in [*trainer.meta_batch(2), *validation_episodes(data, config)]:
        assert episode.support_images.shape[2:] == (16, 16) and episode.query_images.shape[2:] == (32, 32)
        assert [(episode.support_labels == label).sum() for label in range(len(episode.classes))] == [
            config.shape.k_shot
        ] * len(episode.classes)
    whole = dataclasses.replace(config, crop=None)
    assert validation_episodes(data, whole)[0].query_images.shape[2:] == (64, 64)  # None: whole tiles


def test_crops_default_to_windows_every_u_net_takes_and_supports_as_adapt_cuts_them():
    config = TrainConfig()
    assert config.crop is not None and config.crop % 32 == 0  # the base U-Net halves its input 5 times
    assert config.support_window == MapConfig().support_window
    assert TrainConfig(task="classification").crop_shape() is None  # patches keep their majority label
