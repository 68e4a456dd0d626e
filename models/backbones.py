"""Backbones, and the one place that says how an episode reads a model's output.

Every model predicts logits over ALL classes of the scheme (`num_classes`); an episode keeps the
columns of its own classes with `episode_logits(logits, classes)`, its labels being 0..N-1 in the
order of `classes`. So 0-shot prediction and fine-tuning mean the same for MAML, pretraining and
random init, and a model trained on one set of episodes serves any other.

Normalisation is GroupNorm everywhere, never BatchNorm. BatchNorm's batch statistics make a
prediction depend on what else is in the batch: in the inner loop the support set (5-20 items)
would be normalised by its own statistics, the query set by others, and sliding-window prediction
by whichever windows share a batch; its running statistics are also not adapted by the inner
loop. MAML++ fixes this with per-step running statistics, at the cost of state that must be
carried through `functional_call`, checkpoints and fine-tuning budgets that differ from the
meta-training step count. GroupNorm has no state and normalises each item on its own, so the
inner loop, fine-tuning with any number of steps and prediction one window at a time agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255
"""Label of unlabelled pixels; equals `geo.classes.IGNORE_INDEX` (models imports no geo)."""

Task = Literal["classification", "segmentation"]
ArchName = Literal["cnn", "encoder", "unet"]
_TASK_OF: dict[str, str] = {
    "cnn": "classification",
    "encoder": "classification",
    "unet": "segmentation",
}


@dataclass(frozen=True)
class ArchConfig:
    """Everything `build_model` needs; stored in a run's config.json.

    `name`: "cnn" (compact conv net, classification), "encoder" (an smp/timm encoder with a
    pooling head, classification) or "unet" (smp U-Net, segmentation). `encoder*` and
    `decoder_channels` apply to "encoder" and "unet", `width`/`depth` to "cnn".
    """

    task: Task
    name: ArchName
    in_channels: int
    num_classes: int
    encoder: str = "resnet18"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    width: int = 64
    depth: int = 4
    norm_groups: int = 1
    """GroupNorm groups (at most). One group normalises over all channels and pixels: a
    homogeneous patch keeps the relative levels of its channels, i.e. its spectral signature,
    which per-group normalisation of a constant map would erase."""
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    """Per-band statistics of the training data: inputs are standardised inside the model, so
    the statistics travel with the weights into fine-tuning and prediction."""

    def __post_init__(self) -> None:
        if _TASK_OF.get(self.name) != self.task:
            raise ValueError(f"architecture {self.name!r} does not do {self.task}")
        if self.name == "unet" and len(self.decoder_channels) != self.encoder_depth:
            raise ValueError("unet: give one decoder channel count per encoder level")
        if "mobilenetv3" in self.encoder.replace("_", "").lower():
            raise ValueError("MobileNetV3 encoders have no double backward (hardsigmoid): no MAML")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ArchConfig:
        """The inverse of `to_dict`, also after a JSON round trip (lists back to tuples)."""
        values = dict(values)
        values["decoder_channels"] = tuple(values.get("decoder_channels", cls.decoder_channels))
        for key in ("input_mean", "input_std"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def arch_preset(size: Literal["tiny", "base"], task: Task, in_channels: int, num_classes: int) -> ArchConfig:
    """ "tiny": tests and the 2-core CPU demo; "base": real runs on a GPU.

    Classification: the 4-block, 64-filter conv net of the MAML papers ("base") or a 32-filter
    copy ("tiny"). Segmentation: a U-Net on ResNet-18 ("base"), or on timm's 0.1 M-parameter
    `test_resnet` with three levels ("tiny"); inputs must be multiples of 2**encoder_depth.
    """
    if task == "classification":
        width = 64 if size == "base" else 32
        return ArchConfig(task, "cnn", in_channels, num_classes, width=width, depth=4)
    if size == "base":
        return ArchConfig(task, "unet", in_channels, num_classes)
    return ArchConfig(
        task,
        "unet",
        in_channels,
        num_classes,
        encoder="tu-test_resnet",
        encoder_depth=3,
        decoder_channels=(32, 16, 8),
    )


def build_model(config: ArchConfig, seed: int | None = None) -> nn.Module:
    """A freshly initialised model (GroupNorm only); with `seed`, the same weights every time.

    A seed is applied inside a forked RNG, so a seeded build leaves the caller's stream alone;
    without one the model draws from (and advances) the global stream as usual.
    """
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = replace_batchnorm(_build(config), config.norm_groups)
    if config.input_mean is None or config.input_std is None:
        return model
    return Standardized(model, config.input_mean, config.input_std)


class Standardized(nn.Module):
    """(x - mean) / std per band, then the network: reflectance differences between classes
    are a few hundredths, far below what a freshly initialised conv layer resolves well."""

    mean: Tensor
    std: Tensor
    """Buffers (registered in `__init__`), shaped (bands, 1, 1)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).clamp(min=1e-6).view(-1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images - self.mean) / self.std)


def _build(config: ArchConfig) -> nn.Module:
    if config.name == "cnn":
        return CompactCNN(config.in_channels, config.num_classes, config.width, config.depth, config.norm_groups)
    if config.name == "encoder":
        return EncoderClassifier(config.encoder, config.in_channels, config.num_classes, config.encoder_depth)
    return smp.Unet(
        config.encoder,
        encoder_weights=None,
        encoder_depth=config.encoder_depth,
        decoder_channels=config.decoder_channels,
        in_channels=config.in_channels,
        classes=config.num_classes,
    )


class CompactCNN(nn.Module):
    """`depth` blocks of 3x3 conv -> GroupNorm -> ReLU -> 2x2 max-pool, global average, linear.

    The MAML/Prototypical-Network "Conv-4" backbone. ceil_mode pooling keeps a 1x1 map 1x1, so any
    tile size works with any depth.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int, groups: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for block in range(depth):
            blocks += [
                nn.Conv2d(in_channels if block == 0 else width, width, 3, padding=1),
                group_norm(width, groups),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


class EncoderClassifier(nn.Module):
    """An smp encoder (`tu-<timm name>` too), global average pool of its deepest map, linear."""

    def __init__(self, encoder: str, in_channels: int, num_classes: int, depth: int) -> None:
        super().__init__()
        self.encoder = smp.encoders.get_encoder(encoder, in_channels=in_channels, depth=depth, weights=None)
        self.head = nn.Linear(self.encoder.out_channels[-1], num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images)[-1].mean(dim=(2, 3)))


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the most groups <= max_groups that divide `channels`.

    At least 2 channels per group, so a 1x1 feature map is not normalised to zero.
    """
    limit = max(1, min(max_groups, channels // 2))
    groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def replace_batchnorm(module: nn.Module, max_groups: int) -> nn.Module:
    """Every BatchNorm of `module` (in place) swapped for GroupNorm.

    timm's BatchNormAct2d carries its activation (and dropout) inside the norm layer; those are
    kept after the GroupNorm so the network computes the same function class.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            parts = (getattr(child, "drop", None), getattr(child, "act", None))
            tail = [part for part in parts if isinstance(part, nn.Module)]
            norm = group_norm(child.num_features, max_groups)
            setattr(module, name, nn.Sequential(norm, *tail) if tail else norm)
        else:
            replace_batchnorm(child, max_groups)
    return module


def last_layer(model: nn.Module) -> nn.Module:
    """The layer whose input is the embedding: smp's `segmentation_head`, or a classifier's `head`."""
    net = model.net if isinstance(model, Standardized) else model
    for name in ("segmentation_head", "head"):
        layer = getattr(net, name, None)
        if isinstance(layer, nn.Module):
            return layer
    raise TypeError(f"{type(net).__name__} has no segmentation_head or head to take an embedding from")


def last_layer_names(model: nn.Module) -> frozenset[str]:
    """Names (in `model.named_parameters()`) of the last layer's parameters: what ANIL adapts."""
    own = {id(parameter) for parameter in last_layer(model).parameters()}
    return frozenset(name for name, parameter in model.named_parameters() if id(parameter) in own)


def episode_logits(logits: Tensor, classes: Tensor | None) -> Tensor:
    """The columns (dim 1) of an episode's global class ids, in their order; None keeps all."""
    return logits if classes is None else logits.index_select(1, classes)


def episode_loss(logits: Tensor, labels: Tensor, classes: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over labelled items or pixels (IGNORE_INDEX skipped).

    `labels` index the columns kept by `classes` (0..N-1) or, with None, the global ids. With no
    labelled pixel at all the loss is 0 with zero gradient, not NaN, so a sparse support tile
    cannot poison an update.
    """
    total = F.cross_entropy(episode_logits(logits, classes), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
