"""Artifact contents built from the stages' JSON reports (the Prefect calls run in the e2e tests)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flows.artifacts import (
    _read,
    flatten,
    floor_markdown,
    metrics_description,
    metrics_table,
    production_markdown,
    validation_description,
    validation_table,
)

VALIDATION = {
    "success": False,
    "checks": [{"name": "label_set", "success": True, "observed": ["a", "b"]}],
    "failures": [
        {"expectation": "no_leakage", "check": "leak", "unexpected_count": 4, "examples": ["t/1.png", "t/2.png", "t/3.png", "t/4.png"]}
    ],
    "data_profile": {"n_train": 120, "n_test": 40, "content_hash": "abc123"},
}
METRICS = {
    "accuracy": 0.5,
    "macro_f1": 0.45,
    "n_test": 40,
    "per_class": {
        "a": {"precision": 0.6, "recall": 0.75, "f1": 0.666667, "support": 20},
        "b": {"precision": 0.4, "recall": 0.25, "f1": 0.307692, "support": 20},
    },
    "gate": {"passed": False, "min_accuracy": 0.9, "min_class_recall": 0.0, "failures": ["accuracy 0.5000 < gate.min_accuracy 0.9000"]},
}


def test_validation_table_lists_checks_and_failures_with_examples() -> None:
    rows = validation_table(VALIDATION)
    assert rows[0] == {"check": "label_set", "result": "pass", "observed": '["a", "b"]'}
    assert rows[1] == {"check": "no_leakage (leak)", "result": "FAIL", "observed": "4 unexpected, e.g. t/1.png, t/2.png, t/3.png"}
    assert validation_description(VALIDATION) == (
        "Data validation FAILED (1 expectations): 120 train / 40 test images, content hash abc123"
    )


def test_metrics_table_has_one_row_per_class_and_a_total() -> None:
    rows = metrics_table(METRICS)
    assert [r["class"] for r in rows] == ["a", "b", "(all)"]
    assert rows[1]["recall"] == 0.25 and rows[2]["f1"] == 0.45 and rows[2]["support"] == 40
    assert metrics_description(METRICS).startswith("Test accuracy 0.5000 on 40 images, macro F1 0.4500; accuracy floor 0.9 FAILED")


def test_floor_markdown_gives_the_numbers_and_says_production_is_unchanged() -> None:
    md = floor_markdown(METRICS)
    assert "| accuracy | 0.5000 | >= 0.9 |" in md
    assert "| min class recall | 0.2500 | >= 0.0 |" in md
    assert "- accuracy 0.5000 < gate.min_accuracy 0.9000" in md and "Production is unchanged." in md


def test_flatten_names_nested_fields_with_dots() -> None:
    rows = flatten({"provider_active": "cpu", "parity": {"1": {"max_abs_diff": 1e-7}, "7": {"agreement": 1.0}}, "runs": [1, 2]})
    assert rows == [
        {"field": "provider_active", "value": "cpu"},
        {"field": "parity.1.max_abs_diff", "value": 0.0},
        {"field": "parity.7.agreement", "value": 1.0},
        {"field": "runs", "value": "[1, 2]"},
    ]


def test_production_markdown_says_whether_this_run_changed_it() -> None:
    status = {"production": {"version": 3, "model_path": "/r/m/3/model.onnx", "metrics": {"accuracy": 0.97}}}
    assert production_markdown(status, changed=True).startswith("## Production: version 3 (promoted by this run)")
    assert "(unchanged by this run)" in production_markdown(status, changed=False)
    assert "test accuracy: 0.9700" in production_markdown(status, changed=True)
    assert production_markdown({"production": None}, changed=False).startswith("## Production: none")


def test_a_report_older_than_the_stage_run_is_not_published(tmp_path: Path) -> None:
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps(METRICS))
    os.utime(report, (time.time() - 60, time.time() - 60))
    assert _read(report, since=time.time()) is None
    assert _read(report, since=None) == METRICS
    assert _read(tmp_path / "missing.json", since=None) is None
