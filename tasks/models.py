"""The classifiers visionops trains (torchvision), the candidate file's loader, and `Deployable`.

`Deployable` bakes preprocessing into the network (uint8 in, probabilities out), so evaluation,
ONNX export and serving all see exactly the arithmetic training used.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from tasks.errors import DataError

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small")
STEMS: tuple[str, ...] = ("cifar", "imagenet")

# What torch.load(weights_only=True) raises for a truncated, foreign or non-torch file.
TORCH_LOAD_ERRORS: tuple[type[Exception], ...] = (RuntimeError, OSError, EOFError, pickle.UnpicklingError)

# Keys a candidate checkpoint must carry (COMMON.md data contract "train -> models/candidate.pt").
CANDIDATE_KEYS: tuple[str, ...] = (
    "state_dict",
    "arch",
    "stem",
    "num_classes",
    "in_channels",
    "image_size",
    "classes",
    "normalization",
    "params",
    "device",
    "metrics",
)


def build_model(arch: str, stem: str, num_classes: int, in_channels: int) -> nn.Module:
    """A randomly initialised torchvision classifier with its stem and head adapted.

    The cifar stem is a 3x3 stride-1 first conv and no max-pool: on 32 px images the ImageNet
    stem (7x7 stride 2 + max-pool) throws away 15 of every 16 pixels before the first block.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if stem not in STEMS:
        raise ValueError(f"model.stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if arch.startswith("resnet"):
        old = model.conv1
        if stem == "cifar":
            model.conv1 = nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != old.in_channels:
            model.conv1 = nn.Conv2d(in_channels, old.out_channels, 7, stride=2, padding=3, bias=False)
    else:
        old = model.features[0][0]
        stride = 1 if stem == "cifar" else 2
        if stem == "cifar" or in_channels != old.in_channels:
            model.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, stride=stride, padding=1, bias=False)
    return model


def head(model: nn.Module) -> nn.Linear:
    """The final linear layer (resized to the number of classes by `build_model`)."""
    if isinstance(model, torchvision.models.ResNet):
        return model.fc
    if isinstance(model, torchvision.models.MobileNetV3):
        return model.classifier[-1]
    raise TypeError(f"no known head for {type(model).__name__}")


def head_prefix(model: nn.Module) -> str:
    """state_dict key prefix of the head, e.g. ``fc.`` (used to skip it when classes differ)."""
    target = head(model)
    for name, module in model.named_modules():
        if module is target:
            return name + "."
    raise AssertionError("head is not a submodule of its model")


def stem_conv_name(model: nn.Module) -> str:
    """state_dict key of the first conv's weight (adapted when weights come from another stem)."""
    return "conv1.weight" if isinstance(model, torchvision.models.ResNet) else "features.0.0.weight"


def load_candidate(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The candidate classifier (eval mode, CPU, fp32) and its metadata (everything but weights)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run the train stage first (dvc repro train)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as exc:
        raise DataError(f"{path} is not a readable candidate checkpoint ({exc}); rerun the train stage") from exc
    missing = [k for k in CANDIDATE_KEYS if k not in checkpoint]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a visionops candidate; rerun the train stage")
    model = build_model(checkpoint["arch"], checkpoint["stem"], checkpoint["num_classes"], checkpoint["in_channels"])
    model.load_state_dict(checkpoint["state_dict"])
    model.float().eval()
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return model, meta


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x/255 - mean) / std``; mean/std shaped (1, C, 1, 1).

    Training (tasks/augment.py) and `Deployable` both call this, so train and serve see the same
    numbers.
    """
    return (images.to(torch.float32) - 255.0 * mean) * (1.0 / (255.0 * std))


class Deployable(nn.Module):
    """uint8 images (N, C, H, W) -> float32 softmax probabilities (N, num_classes)."""

    def __init__(self, classifier: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def from_candidate(cls, path: Path) -> Deployable:
        """The candidate at ``path`` with its training normalisation baked in (eval, CPU, fp32)."""
        classifier, meta = load_candidate(path)
        norm = meta["normalization"]
        return cls(classifier, norm["mean"], norm["std"]).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(normalize(images, self.mean, self.std))
        return torch.softmax(logits.float(), dim=1)
