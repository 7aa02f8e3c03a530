"""evaluate: metrics by hand, the confusion CSV for `dvc plots`, and the floor's exit code 3."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from candidate_factory import run_stage, tiny_candidate, write_params

from tasks.downloads import file_digest
from tasks.evaluate import classification_metrics, confusion_csv, evaluate
from tasks.params import GateParams
from tasks.paths import Workspace


def test_metrics_match_a_hand_computed_confusion_matrix() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 0])
    m = classification_metrics(labels, predicted, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3), 3)
    assert a["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert (b["precision"], b["recall"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)  # never predicted: no division by zero
    assert m["macro_f1"] == pytest.approx((a["f1"] + b["f1"] + 0.0) / 3)


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
    assert metrics["gate"] == {"passed": True, "min_accuracy": 0.0, "min_class_recall": 0.0, "failures": []}
    assert metrics["candidate_sha256"] == file_digest(ws.candidate_weights)
    assert result.floor.passed


def test_failed_floor_writes_reports_then_exits_3(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    tiny_candidate(ws, n_test=12)
    write_params(ws, {"gate.min_accuracy": 1.0, "gate.min_class_recall": 1.0})
    proc = run_stage(ws, "tasks.evaluate")
    assert proc.returncode == 3, proc.stderr
    assert "GateRejected" in proc.stderr and "gate.min_accuracy 1.0000" in proc.stderr
    metrics = json.loads(ws.metrics.read_text())
    assert metrics["gate"]["passed"] is False
    assert any("recall of class" in f for f in metrics["gate"]["failures"])
    assert len(ws.confusion.read_text().splitlines()) == 13
