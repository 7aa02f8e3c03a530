"""The candidate file (models/candidate.pt): trained weights and what it takes to rebuild and deploy them.

`save_candidate` and `load_candidate` are the only writer and reader of the format. `Deployable`
bakes preprocessing into the network (uint8 in, probabilities out), so evaluation, ONNX export
and serving all see exactly the arithmetic training used.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import DataError
from tasks.fs.atomic import atomic_write_bytes
from tasks.training.models import TORCH_LOAD_ERRORS, build_model, eval_resize_crop, normalize


@dataclass(frozen=True)
class Candidate:
    """One trained classifier, as train writes it (CPU fp32 weights, plain values for ``weights_only`` loads)."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    stem: str
    num_classes: int
    in_channels: int
    image_size: int  # px, square
    classes: list[str]  # index = label
    normalization: dict[str, list[float]]  # {"mean": [...], "std": [...]} per channel, 0..1 scale
    params: dict[str, Any]  # the resolved model, train and schedule parameters
    device: str  # cuda | cpu: where it was trained
    device_name: str
    weights_source: str  # where training started from
    data_digest: str  # of the prepared arrays it was trained on
    metrics: dict[str, float]  # test_accuracy, train_loss, epochs, train_seconds, images_per_s
    eval_crop: float = 1.0  # train.augment.eval_crop: the evaluation view `Deployable` applies (1.0 = none)

    def classifier(self) -> nn.Module:
        """The network with these weights, in eval mode, on the CPU, fp32."""
        model = build_model(self.arch, self.stem, self.num_classes, self.in_channels)
        model.load_state_dict(self.state_dict)
        return model.float().eval()


def save_candidate(path: Path, candidate: Candidate) -> None:
    """Write ``candidate`` atomically (a reader never sees half a file)."""
    payload = {f.name: getattr(candidate, f.name) for f in dataclasses.fields(candidate)}
    payload["state_dict"] = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in candidate.state_dict.items()
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_candidate(path: Path) -> Candidate:
    """The candidate at ``path``; :class:`DataError` naming the file when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run the train stage first (dvc repro train)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as exc:
        raise DataError(f"{path} is not a readable candidate checkpoint ({exc}); rerun the train stage") from exc
    fields = dataclasses.fields(Candidate)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    missing = [k for k in required if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a visionops candidate; rerun the train stage")
    return Candidate(**{f.name: raw[f.name] for f in fields if f.name in raw})


class Deployable(nn.Module):
    """uint8 images (N, C, H, W) -> float32 softmax probabilities (N, num_classes).

    Inside: the evaluation view (resize + centre crop when ``eval_crop`` < 1), normalisation, the
    classifier, softmax; exactly what training evaluated, so serving sees what evaluation saw.
    """

    mean: torch.Tensor  # buffers, (1, C, 1, 1)
    std: torch.Tensor

    def __init__(
        self, classifier: nn.Module, mean: Sequence[float], std: Sequence[float], eval_crop: float = 1.0
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if not 0 < eval_crop <= 1:
            raise ValueError(f"eval_crop must be in (0, 1], got {eval_crop}")
        self.classifier = classifier
        self.eval_crop = eval_crop
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def of(cls, candidate: Candidate, classifier: nn.Module | None = None) -> Deployable:
        """``candidate`` (or another ``classifier`` built from it) with its normalisation baked in."""
        norm = candidate.normalization
        classifier = classifier if classifier is not None else candidate.classifier()
        return cls(classifier, norm["mean"], norm["std"], candidate.eval_crop).eval()

    @classmethod
    def from_candidate(cls, path: Path) -> Deployable:
        """The candidate at ``path`` with its training normalisation baked in (eval, CPU, fp32)."""
        return cls.of(load_candidate(path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(normalize(eval_resize_crop(images, self.eval_crop), self.mean, self.std))
        return torch.softmax(logits.float(), dim=1)
