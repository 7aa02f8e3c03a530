"""evaluate: the candidate on the test split -> reports/metrics.json, reports/confusion.csv, and the
floor's verdict in metrics/evaluate.json (DVC metrics).

A candidate below the floor is a result, not a crash: the stage records ``gate.passed: false``
with the reasons and exits 0, so ``dvc repro`` and ``dvc exp run`` finish and ``dvc exp show`` puts
a weak experiment beside a good one. Nothing unblessed gets further: the flow ends Rejected
(``visionops run`` exits 3) and promotion refuses a candidate whose recorded floor failed.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass

import numpy as np

from tasks import params
from tasks.blessing.gate import check_floor
from tasks.blessing.reports import EvaluationMetrics, MetricsReport
from tasks.blessing.scoring import (
    Classification,
    classification_metrics,
    torch_device,
    torch_probabilities,
)
from tasks.data.prepared import load_split
from tasks.entry import StageSpec, run_stage
from tasks.fs.atomic import atomic_write_text
from tasks.fs.hashing import file_digest
from tasks.params import GateParams
from tasks.paths import Workspace

log = logging.getLogger(__name__)


def confusion_csv(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> str:
    """One row per test image (actual, predicted class names): the shape `dvc plots` confusion reads."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(labels.tolist(), predicted.tolist(), strict=True))
    return buf.getvalue()


SPEC = StageSpec(
    "evaluate",
    params=("gate.min_accuracy", "gate.min_class_recall"),
    reads=lambda ws: [ws.candidate, ws.images("test"), ws.labels("test"), ws.classes],
    writes=lambda ws: [ws.metrics, ws.evaluation_metrics, ws.confusion],
)


@dataclass(frozen=True)
class CandidateScores:
    """The candidate's predictions on the test split and what they score: no gate applied yet."""

    scores: Classification
    labels: np.ndarray  # int64 (N,)
    predicted: np.ndarray  # int64 (N,)
    classes: list[str]
    device: str


def score_candidate(ws: Workspace) -> CandidateScores:
    """Score models/candidate.pt on the test split, read from prepared/ in batches."""
    from tasks.training.candidate import Deployable

    split = load_split(ws, "test")
    model = Deployable.from_candidate(ws.candidate)
    device = torch_device()
    log.info("evaluating %s on %d test images (%s)", ws.candidate, len(split.labels), device)
    predicted = torch_probabilities(model, split.images, device).argmax(axis=1)
    return CandidateScores(
        classification_metrics(split.labels, predicted, split.classes), split.labels, predicted, split.classes,
        str(device),
    )


def evaluate(p: GateParams, ws: Workspace) -> MetricsReport:
    """Score the candidate, write both reports, then apply the floor."""
    candidate = score_candidate(ws)
    scores = candidate.scores
    floor = check_floor(scores.accuracy, {n: v.recall for n, v in scores.per_class.items()}, p)
    report = MetricsReport(
        accuracy=scores.accuracy,
        macro_f1=scores.macro_f1,
        n_test=scores.n_test,
        per_class=scores.per_class,
        gate=floor,
        classes=candidate.classes,
        confusion_matrix=scores.confusion_matrix,
        device=candidate.device,
        candidate_sha256=file_digest(ws.candidate),
    )
    report.write(ws.metrics)
    EvaluationMetrics.of(report).write(ws.evaluation_metrics)
    atomic_write_text(ws.confusion, confusion_csv(candidate.labels, candidate.predicted, candidate.classes))
    log.info("accuracy %.4f, macro F1 %.4f -> %s", report.accuracy, report.macro_f1, ws.metrics)
    if not floor.passed:
        log.warning(
            "candidate FAILS the accuracy floor: %s (gate.passed: false in %s); it will not be promoted:"
            " train a better model or lower the floor in params.yaml",
            "; ".join(floor.failures),
            ws.evaluation_metrics,
        )
    return report


def main() -> None:
    evaluate(params.load().gate, Workspace.here())


if __name__ == "__main__":
    run_stage(main)
