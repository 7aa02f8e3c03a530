"""Where training starts from (``model.weights``): none, ImageNet, a .pt file, or production.

Weights are copied by name wherever shapes agree. The head is left fresh when the number of
classes differs; a pretrained first conv is summed over colour to feed grayscale, and left fresh
when the stem differs (a 7x7 ImageNet kernel does not fit the 3x3 cifar stem).
"""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import DataError, RegistryError, RuntimeUnavailable
from tasks.params import ModelParams, RegistryParams
from tasks.paths import Workspace
from tasks.training.models import TORCH_LOAD_ERRORS, head_prefix, stem_conv_name

log = logging.getLogger(__name__)


def imagenet_cache_file(arch: str) -> Path:
    """Where torchvision's weights API keeps ``arch``'s ImageNet weights (the torch hub cache)."""
    from torchvision.models import get_model_weights

    url = get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    expected = imagenet_cache_file(arch)
    try:
        return weights.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeUnavailable(
            f"model.weights=imagenet: could not fetch {weights.url} ({exc}). Offline, put that file at"
            f" {expected} (torch hub cache; TORCH_HOME moves it) or set model.weights=none"
        ) from exc


def _production_file(ws: Workspace, registry: RegistryParams | None) -> Path:
    if registry is None:
        raise AssertionError("model.weights=production needs the registry parameters")
    from tasks.registry import Registry  # lazy: only model.weights=production reads the registry

    path = Registry.open(ws, registry).production_weights()
    if path is None:
        raise RegistryError(
            f"model.weights=production but registry {registry.uri} has no production version of"
            f" {registry.model_name} (or it has no weights.pt); train with model.weights=none or imagenet first"
        )
    return Path(path)


def _file_state(path: Path, arch: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"model.weights: {path} not found; give a .pt state dict or candidate file, or none")
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as exc:
        raise DataError(f"model.weights: {path} is not a readable torch file ({exc})") from exc
    if isinstance(loaded, dict) and "state_dict" in loaded:  # a visionops candidate or production weights.pt
        if loaded.get("arch", arch) != arch:
            raise DataError(f"model.weights: {path} holds a {loaded['arch']} but model.arch is {arch}")
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DataError(f"model.weights: {path} is not a state dict (name -> tensor)")
    return loaded


def transfer(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy ``state`` into ``model`` by name; returns the keys left freshly initialised."""
    target = model.state_dict()
    head = head_prefix(model)
    stem = stem_conv_name(model)
    fresh: list[str] = []
    merged: dict[str, torch.Tensor] = {}
    for key, value in target.items():
        incoming = state.get(key)
        if incoming is not None and incoming.shape == value.shape:
            merged[key] = incoming
        elif key == stem and incoming is not None and incoming.shape[2:] == value.shape[2:] and value.shape[1] == 1:
            merged[key] = incoming.sum(dim=1, keepdim=True)  # RGB kernel -> grayscale: same response to gray
        elif key.startswith(head) or key == stem:
            fresh.append(key)
            merged[key] = value
        else:
            have = "missing" if incoming is None else f"shape {tuple(incoming.shape)}"
            raise DataError(
                f"model.weights={source} does not fit the model: {key} is {have}, the model needs"
                f" {tuple(value.shape)}; check model.arch and model.stem"
            )
    model.load_state_dict(merged)
    return fresh


def load_initial_weights(
    model: nn.Module, m: ModelParams, ws: Workspace, registry: RegistryParams | None = None
) -> str:
    """Initialise ``model`` as ``model.weights`` says; returns a one-line description for logs."""
    if m.weights == "none":
        return "random initialisation"
    if m.weights == "imagenet":
        state, source = _imagenet_state(m.arch), f"imagenet ({imagenet_cache_file(m.arch).name})"
    elif m.weights == "production":
        path = _production_file(ws, registry)
        state, source = _file_state(path, m.arch), f"production ({path})"
    else:
        path = Path(m.weights) if Path(m.weights).is_absolute() else ws.root / m.weights
        state, source = _file_state(path, m.arch), str(path)
    fresh = transfer(model, state, source)
    if fresh:
        log.info("from %s; fresh: %s", source, ", ".join(fresh))
    return source
