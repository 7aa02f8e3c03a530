"""The classifiers visionops trains (torchvision): built, their head and stem found, inputs normalised."""

from __future__ import annotations

import pickle

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small")
STEMS: tuple[str, ...] = ("cifar", "imagenet")

# What torch.load(weights_only=True) raises for a truncated, foreign or non-torch file.
TORCH_LOAD_ERRORS: tuple[type[Exception], ...] = (RuntimeError, OSError, EOFError, pickle.UnpicklingError)
# The per-channel statistics torchvision's ImageNet weights were trained with (RGB, 0..1 scale).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def imagenet_normalization(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's mean and std for ``channels``; grayscale takes the mean of the three (its first conv
    is the sum of the RGB kernels, tasks/training/weights.py)."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]


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


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x/255 - mean) / std``; mean/std shaped (1, C, 1, 1).

    Training (tasks/training/splits.py) and `Deployable` (tasks/training/candidate.py) both call
    this, so train and serve see the same numbers.
    """
    return (images.to(torch.float32) - 255.0 * mean) * (1.0 / (255.0 * std))


def eval_resize_crop(images: torch.Tensor, crop: float) -> torch.Tensor:
    """The evaluation view: resize (bilinear) to ``size / crop``, keep the centre ``size`` square.

    ``crop`` 0.875 on 224 px is the classic "resize 256, center-crop 224"; 1.0 returns ``images``
    untouched. Training's evaluation and `Deployable` (so the ONNX model) both call this.
    """
    if crop >= 1.0:
        return images
    height, width = images.shape[-2:]
    resized = (round(height / crop), round(width / crop))
    x = F.interpolate(images.float(), size=resized, mode="bilinear", align_corners=False, antialias=False)
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    return x[..., top : top + height, left : left + width]


def set_train_mode(model: nn.Module, freeze: str) -> None:
    """Train mode, except that a frozen backbone keeps its BatchNorm statistics (eval mode)."""
    model.train()
    if freeze == "backbone":
        classifier_head = head(model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module is not classifier_head:
                module.eval()


def freeze(model: nn.Module, mode: str) -> None:
    """``train.freeze: backbone``: only the head's parameters keep requiring gradients."""
    if mode == "backbone":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in head(model).parameters():
            parameter.requires_grad_(True)
