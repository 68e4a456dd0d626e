"""Backbones, episode logits, fine-tuning, pretraining, checkpoints and resuming, devices."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from models.backbones import (
    IGNORE_INDEX,
    ArchConfig,
    arch_preset,
    build_model,
    episode_logits,
    episode_loss,
)
from models.checkpoint import (
    CONFIG,
    TRAIN_STATE,
    WEIGHTS,
    RunConfig,
    load_run,
    load_train_state,
    save_run,
    save_train_state,
)
from models.device import autocast, forward_batch, pick_device
from models.finetune import finetune, predict
from models.learner import LearnerSettings
from models.maml import Maml
from models.pretrain import Pretrain

CONFIGS = [
    arch_preset("tiny", "classification", 13, 10),
    arch_preset("tiny", "segmentation", 13, 10),
    ArchConfig("classification", "encoder", 3, 6, encoder="tu-test_efficientnet", encoder_depth=3),
    ArchConfig(
        "segmentation",
        "unet",
        3,
        6,
        encoder="resnet18",
        encoder_depth=3,
        decoder_channels=(32, 16, 8),
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-{c.encoder}")
def test_every_model_has_groupnorm_only_and_logits_over_all_classes(config: ArchConfig):
    model = build_model(config, seed=0)
    kinds = [type(module) for module in model.modules()]
    assert not any(issubclass(kind, nn.modules.batchnorm._BatchNorm) for kind in kinds)
    assert nn.GroupNorm in kinds
    output = model(torch.randn(2, config.in_channels, 32, 32))
    expected = (2, config.num_classes) + ((32, 32) if config.task == "segmentation" else ())
    assert output.shape == expected


def test_timm_norm_activation_layers_keep_their_activation():
    config = CONFIGS[2]
    activations = (nn.SiLU, nn.ReLU)

    def count(model: nn.Module) -> int:
        return sum(isinstance(module, activations) for module in model.modules())

    original = smp.encoders.get_encoder(config.encoder, in_channels=3, depth=3, weights=None)
    assert count(build_model(config).get_submodule("encoder")) == count(original)


def test_arch_config_survives_json_and_rejects_mismatches():
    config = arch_preset("tiny", "segmentation", 13, 10)
    assert ArchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError):
        ArchConfig("segmentation", "cnn", 13, 10)
    with pytest.raises(ValueError):
        ArchConfig("segmentation", "unet", 13, 10, encoder="timm-mobilenetv3_small_100")


def test_a_seed_fixes_the_initial_weights_and_leaves_the_global_stream_alone():
    config = arch_preset("tiny", "classification", 13, 10)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second = build_model(config, seed=7), build_model(config, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)

    def head(model: nn.Module) -> torch.Tensor:
        return model.get_parameter("head.weight")

    assert not torch.equal(head(first), head(build_model(config, seed=8)))
    assert not torch.equal(head(build_model(config)), head(build_model(config)))


def test_episode_logits_keep_the_episode_classes_in_their_order():
    logits = torch.arange(2 * 5 * 3).reshape(2, 5, 3).float()
    restricted = episode_logits(logits, torch.tensor([4, 1]))
    assert torch.equal(restricted, torch.stack([logits[:, 4], logits[:, 1]], dim=1))
    assert episode_logits(logits, None) is logits


def test_episode_loss_ignores_unlabelled_pixels_and_never_gives_nan():
    logits = torch.randn(1, 5, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, IGNORE_INDEX], [1, IGNORE_INDEX]]])
    classes = torch.tensor([3, 0])
    expected = nn.functional.cross_entropy(logits[:, [3, 0]], labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(episode_loss(logits, labels, classes), expected)
    empty = episode_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX), classes)
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None and torch.all(logits.grad == 0)


def _separable_support(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """8 items, 2 classes: class 1 brightens channel 0."""
    labels = np.array([0, 1] * 4)
    images = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
    images[:, 0] += 2.0 * labels[:, None, None] - 1.0
    return images, labels


def _small_cnn(seed: int = 0) -> nn.Module:
    return build_model(ArchConfig("classification", "cnn", 3, 10, width=8, depth=2), seed=seed)


def _support_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, classes) -> float:
    return float((predict(model, images, classes).argmax(1) == labels).mean())


def test_finetuning_raises_support_accuracy_and_leaves_the_original_alone():
    images, labels = _separable_support(np.random.default_rng(0))
    classes = np.array([6, 2])
    model = _small_cnn()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tuned = finetune(model, images, labels, classes, steps=30, lr=0.5)
    assert _support_accuracy(tuned, images, labels, classes) == 1.0
    assert _support_accuracy(model, images, labels, classes) < 1.0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_finetuning_zero_steps_or_no_labels_is_the_model_as_is():
    images, labels = _separable_support(np.random.default_rng(1))
    model = _small_cnn()
    for tuned in (
        finetune(model, images, labels, [0, 1], steps=0, lr=0.5),
        finetune(model, images[:0], labels[:0], [0, 1], steps=5, lr=0.5),
    ):
        assert tuned is not model
        for a, b in zip(tuned.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)


def test_finetuning_is_deterministic_and_takes_per_tensor_rates():
    images, labels = _separable_support(np.random.default_rng(2))
    model = _small_cnn()
    rates = {name: 0.2 for name, _ in model.named_parameters()}
    with torch.no_grad():
        first = finetune(model, images, labels, [1, 3], steps=4, lr=rates, seed=5)
    second = finetune(model, images, labels, [1, 3], steps=4, lr=0.2, seed=5)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError):
        finetune(model, images, labels, [1, 3], steps=1, lr={"head.weight": 0.1})


def test_predict_gives_scores_over_episode_classes():
    model = build_model(arch_preset("tiny", "segmentation", 3, 7), seed=0)
    scores = predict(model, np.zeros((3, 3, 16, 16), np.float32), [6, 0, 2], batch_size=2)
    assert scores.shape == (3, 3, 16, 16) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_predict_on_a_cpu_runs_large_windows_a_few_at_a_time_with_the_same_scores():
    model = build_model(arch_preset("tiny", "segmentation", 3, 4), seed=0).eval()
    windows = np.random.default_rng(0).random((5, 3, 256, 256), dtype=np.float32)
    assert forward_batch(torch.device("cpu"), windows.shape, 8) == 2  # 5 windows: chunks of 2, 2, 1
    with torch.no_grad():
        whole = model(torch.from_numpy(windows)).softmax(dim=1).numpy()
    np.testing.assert_allclose(predict(model, windows, None, batch_size=8), whole, atol=1e-5)
    assert forward_batch(torch.device("cpu"), (64, 3, 32, 32), 64) == 64  # small tiles: all at once


def test_pretraining_lowers_the_loss_on_global_class_ids():
    rng = np.random.default_rng(3)
    images, labels = _separable_support(rng)
    labels = np.where(labels == 1, 7, 2)
    learner = Pretrain(_small_cnn(), LearnerSettings(outer_lr=0.01))
    losses = [learner.step((images, labels), iteration) for iteration in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def _run_config(**changes) -> RunConfig:
    values = dict(
        method="maml",
        task="classification",
        arch=ArchConfig("classification", "cnn", 3, 10, width=8, depth=2),
        class_names=tuple(f"c{i}" for i in range(10)),
        class_colors=tuple((i, i, i) for i in range(10)),
        bands=("B2", "B3", "B4"),
        normalisation={"clip": [0, 10000], "divide": 10000},
        seed=0,
        iterations=5,
        inner_steps=2,
        inner_lr=0.1,
        learn_inner_lr=True,
        finetune_steps=4,
        settings={"meta_batch": 4},
    )
    return RunConfig(**{**values, **changes})


def test_run_directory_round_trip_with_weights_only(tmp_path):
    learner = Maml(_small_cnn(), LearnerSettings(inner_steps=2, inner_lr=0.1))
    with torch.no_grad():
        for log_lr in learner.log_lrs:
            log_lr.uniform_(-3, -1)
    config = _run_config()
    save_run(tmp_path, learner.model, config, learner.inner_rates())
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]
    raw = torch.load(tmp_path / WEIGHTS, weights_only=True)
    assert set(raw) == {"model", "inner_lrs"}

    run = load_run(tmp_path)
    assert run.config == config
    for name, value in learner.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], value)
    for name, rate in learner.inner_rates().items():
        assert run.inner_lrs[name] == pytest.approx(float(rate))
    assert not run.model.training


def test_a_write_killed_halfway_keeps_the_previous_file(tmp_path, monkeypatch):
    save_run(tmp_path, _small_cnn(), _run_config())
    before = (tmp_path / WEIGHTS).read_bytes()

    def torn_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        save_run(tmp_path, _small_cnn(seed=1), _run_config(iterations=9))
    assert (tmp_path / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]


def _episode() -> SimpleNamespace:
    """Random data from all three global generators, so resuming must restore each."""
    labels = np.array([0, 1, 0, 1])
    shift = random.random()
    images = np.random.normal(size=(4, 3, 8, 8)).astype(np.float32) + shift
    query = (torch.randn(4, 3, 8, 8) + 2 * torch.tensor(labels)[:, None, None, None]).numpy()
    return SimpleNamespace(
        classes=np.array([4, 9]),
        support_images=images,
        support_labels=labels,
        query_images=query,
        query_labels=labels,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resumed_training_takes_the_same_next_steps(tmp_path):
    _seed_everything(0)
    uninterrupted = Maml(_small_cnn(), LearnerSettings(inner_steps=2, inner_lr=0.1))
    losses = [uninterrupted.step([_episode()], i) for i in range(4)]

    _seed_everything(0)
    killed = Maml(_small_cnn(), LearnerSettings(inner_steps=2, inner_lr=0.1))
    for _ in range(2):
        killed.step([_episode()], 0)
    save_train_state(tmp_path, killed, killed.optimizer, iteration=2)
    _seed_everything(99)

    resumed = Maml(_small_cnn(seed=42), LearnerSettings(inner_steps=2, inner_lr=0.1))
    start = load_train_state(tmp_path, resumed, resumed.optimizer)
    assert start == 2
    resumed_losses = [resumed.step([_episode()], i) for i in range(start, 4)]
    assert resumed_losses == losses[2:]
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert load_train_state(tmp_path / "fresh", resumed, resumed.optimizer) == 0
    assert torch.load(tmp_path / TRAIN_STATE, weights_only=True)["iteration"] == 2


def test_device_choice_and_autocast_on_cpu():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            pick_device("cuda")
    with autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
