"""evaluate: the confusion CSV for `dvc plots`, and the floor's verdict recorded as a DVC metric."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.blessing.reports import EvaluationMetrics, MetricsReport
from tasks.evaluate import confusion_csv, evaluate
from tasks.fs.hashing import file_digest
from tasks.params import GateParams
from tasks.paths import Workspace

from candidate_factory import run_stage, tiny_candidate, write_params


def test_confusion_csv_has_one_row_per_image_with_class_names() -> None:
    text = confusion_csv(np.array([1, 0]), np.array([1, 1]), ["cat", "dog"])
    assert list(csv.DictReader(text.splitlines())) == [
        {"actual": "dog", "predicted": "dog"},
        {"actual": "cat", "predicted": "dog"},
    ]


def test_evaluate_writes_reports_that_agree(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    tiny_candidate(ws, n_test=30)
    result = evaluate(GateParams(min_accuracy=0.0, min_class_recall=0.0, max_regression=0.0, confidence=0.95), ws)
    metrics = json.loads(ws.metrics.read_text())
    rows = list(csv.DictReader(ws.confusion.read_text().splitlines()))
    assert len(rows) == metrics["n_test"] == 30
    assert metrics["accuracy"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / 30)
    assert metrics["gate"] == {
        "passed": True, "accuracy": metrics["accuracy"], "min_accuracy": 0.0, "min_class_recall": 0.0, "failures": []
    }
    assert metrics["candidate_sha256"] == file_digest(ws.candidate)
    assert result == MetricsReport.read(ws.metrics, 'evaluate') and result.gate.passed
    assert json.loads(ws.evaluation_metrics.read_text()) == {
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "gate": {"passed": True, "reasons": ""}
    }


def test_a_failed_floor_is_recorded_as_the_gate_verdict_not_raised(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    tiny_candidate(ws, n_test=12)
    report = evaluate(GateParams(min_accuracy=1.0, min_class_recall=1.0, max_regression=0.0, confidence=0.95), ws)
    metrics = json.loads(ws.metrics.read_text())
    assert metrics["gate"]["passed"] is False and not report.gate.passed
    assert any("recall of class" in f for f in metrics["gate"]["failures"])
    assert len(ws.confusion.read_text().splitlines()) == 13
    headline = json.loads(ws.evaluation_metrics.read_text())
    assert set(headline) == {"accuracy", "macro_f1", "gate"}
    assert headline["gate"]["passed"] is False and "gate.min_accuracy 1.0000" in headline["gate"]["reasons"]
    assert EvaluationMetrics.read(ws.evaluation_metrics, "evaluate") == EvaluationMetrics.of(report)


@pytest.mark.integration
def test_the_stage_entry_exits_0_on_a_failed_floor_and_says_it_will_not_be_promoted(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    tiny_candidate(ws, n_test=12)
    write_params(ws, {"gate.min_accuracy": 1.0, "gate.min_class_recall": 1.0})
    proc = run_stage(ws, "tasks.evaluate")
    assert proc.returncode == 0, proc.stderr
    assert "FAILS the accuracy floor" in proc.stderr and "will not be promoted" in proc.stderr
    assert json.loads(ws.evaluation_metrics.read_text())["gate"]["passed"] is False
