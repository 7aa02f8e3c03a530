"""evaluate: the candidate on the test split -> reports/metrics.json, reports/confusion.csv, floor gate.

Both reports are written before the gate is applied, so a rejected candidate still leaves its
numbers for `dvc metrics show` and `dvc plots`; then `GateRejected` stops `dvc repro` (exit 3).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.atomic import atomic_write_json, atomic_write_text
from tasks.downloads import file_digest
from tasks.errors import GateRejected
from tasks.gate import FloorCheck, check_floor
from tasks.params import GateParams
from tasks.paths import Workspace
from tasks.prepared import load_split

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BATCH = 256  # images per forward pass; memory only, results do not depend on it


def torch_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_probabilities(model: torch.nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """float32 probabilities (N, K) from a `Deployable` on uint8 images, fp32 (TF32 off)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.to(device).eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH])).to(device)
            parts.append(model(batch).float().cpu().numpy())
    return np.concatenate(parts)


def classification_metrics(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix."""
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class: dict[str, dict[str, float | int]] = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        support = int(confusion[i].sum())
        predicted_as = int(confusion[:, i].sum())
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [v["f1"] for v in per_class.values() if v["support"]]
    return {
        "accuracy": float(np.trace(confusion) / len(labels)),
        "macro_f1": float(np.mean(present)) if present else 0.0,
        "n_test": len(labels),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def confusion_csv(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> str:
    """One row per test image (actual, predicted class names): the shape `dvc plots` confusion reads."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(labels.tolist(), predicted.tolist(), strict=True))
    return buf.getvalue()


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    floor: FloorCheck


def evaluate(gate: GateParams, ws: Workspace) -> Evaluation:
    """Score models/candidate.pt on the test split, write both reports, then apply the floor."""
    from tasks.models import Deployable

    split = load_split(ws, "test")
    model = Deployable.from_candidate(ws.candidate_weights)
    device = torch_device()
    log.info("evaluating %s on %d test images (%s)", ws.candidate_weights, len(split.labels), device)
    predicted = torch_probabilities(model, split.images, device).argmax(axis=1)
    metrics = classification_metrics(split.labels, predicted, split.classes)
    floor = check_floor(metrics["accuracy"], {n: v["recall"] for n, v in metrics["per_class"].items()}, gate)
    report = {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "n_test": metrics["n_test"],
        "per_class": metrics["per_class"],
        "gate": {
            "passed": floor.passed,
            "min_accuracy": floor.min_accuracy,
            "min_class_recall": floor.min_class_recall,
            "failures": list(floor.failures),
        },
        "classes": split.classes,
        "confusion_matrix": metrics["confusion_matrix"],
        "device": str(device),
        "candidate_sha256": file_digest(ws.candidate_weights),
    }
    atomic_write_json(ws.metrics, report)
    atomic_write_text(ws.confusion, confusion_csv(split.labels, predicted, split.classes))
    log.info("accuracy %.4f, macro F1 %.4f -> %s", metrics["accuracy"], metrics["macro_f1"], ws.metrics)
    if not floor.passed:
        raise GateRejected(
            "candidate fails the accuracy floor: "
            + "; ".join(floor.failures)
            + f" (reports in {ws.metrics}); train a better model or lower the floor in params.yaml"
        )
    return Evaluation(report, floor)


def _main() -> None:
    from tasks import params

    evaluate(params.load().gate, Workspace.here())


if __name__ == "__main__":
    from tasks.entry import run_stage

    run_stage(_main)
