"""Scoring a PyTorch model on uint8 images: probabilities in batches, and the classification metrics.

Images come in batches from a prepared file (or an array), so scoring holds one batch of pixels;
only the probabilities, N x classes float32, are kept for the whole split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.blessing.reports import ClassScores
from tasks.data.prepared import Images, image_batches

if TYPE_CHECKING:
    import torch

MAX_BATCH = 256  # images per forward pass, at most
# uint8 input bytes per forward pass: 32 images at 224 px. The float activations of a network's
# first layers are ~40x the input (256 images at 224 px took evaluate past a 600 MiB cgroup).
_BATCH_BYTES = 32 * 3 * 224 * 224


def scoring_batch(image_shape: tuple[int, ...]) -> int:
    """Images per forward pass for images of ``image_shape`` (C, H, W): 256 at 32 px, 32 at 224 px.
    Memory only: the results do not depend on it."""
    return max(1, min(MAX_BATCH, _BATCH_BYTES // math.prod(image_shape)))


def torch_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_probabilities(model: torch.nn.Module, images: Images, device: torch.device) -> np.ndarray:
    """float32 probabilities (N, K) from a `Deployable` on uint8 images, fp32 (TF32 off)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.to(device).eval()
    parts = []
    with torch.inference_mode():
        for batch in image_batches(images, scoring_batch(images.shape[1:]), "scoring with PyTorch"):
            parts.append(model(torch.from_numpy(batch).to(device)).float().cpu().numpy())
    return np.concatenate(parts)


@dataclass(frozen=True)
class Classification:
    """How a model's predictions on a labelled split compare with the labels."""

    accuracy: float
    macro_f1: float  # over the classes present in the split
    n_test: int
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]  # [actual][predicted]


def classification_metrics(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> Classification:
    """accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix."""
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class: dict[str, ClassScores] = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        support = int(confusion[i].sum())
        predicted_as = int(confusion[:, i].sum())
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = ClassScores(precision=precision, recall=recall, f1=f1, support=support)
    present = [v.f1 for v in per_class.values() if v.support]
    return Classification(
        accuracy=float(np.trace(confusion) / len(labels)),
        macro_f1=float(np.mean(present)) if present else 0.0,
        n_test=len(labels),
        per_class=per_class,
        confusion_matrix=confusion.tolist(),
    )
