"""Artifact contents built from the stages' typed reports (the Prefect calls run in the e2e tests)."""

from __future__ import annotations

import os
import time
from dataclasses import replace
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
from tasks.blessing.reports import ClassScores, InputContract, MetricsReport
from tasks.data.reports import CheckSummary, DataProfile, ModelDrift, NearDuplicates, ValidationFailure
from tasks.registry.status import HeadlineMetrics, ProductionStatus, RegistryStatus

from candidate_factory import floor_check, validation_report

VALIDATION = replace(
    validation_report(success=False, profile=DataProfile({"a": 1.0}, 0.5, 0.2, 120, 40, "abc123")),
    checks=[CheckSummary("label_set", True, ["a", "b"])],
    failures=[ValidationFailure("no_leakage", "leak", "", 4, ["t/1.png", "t/2.png", "t/3.png", "t/4.png"], "")],
)
METRICS = MetricsReport(
    accuracy=0.5,
    macro_f1=0.45,
    n_test=40,
    per_class={
        "a": ClassScores(precision=0.6, recall=0.75, f1=0.666667, support=20),
        "b": ClassScores(precision=0.4, recall=0.25, f1=0.307692, support=20),
    },
    gate=floor_check(0.5, passed=False, min_accuracy=0.9),
    classes=["a", "b"],
    confusion_matrix=[[15, 5], [15, 5]],
    device="cpu",
    candidate_sha256="c",
)


def test_validation_table_lists_checks_and_failures_with_examples() -> None:
    rows = validation_table(VALIDATION)
    assert rows[0] == {"check": "label_set", "result": "pass", "observed": '["a", "b"]'}
    assert rows[1] == {
        "check": "no_leakage (leak)", "result": "FAIL", "observed": "4 unexpected, e.g. t/1.png, t/2.png, t/3.png"
    }
    assert validation_description(VALIDATION) == (
        "Data validation FAILED (1 expectations): 120 train / 40 test images, content hash abc123"
    )


def test_validation_summary_shows_warnings_near_duplicates_and_the_models_view() -> None:
    warned = ValidationFailure("expect_column_values_to_be_between", "drift_confidence", "confidence_ks", 1,
                               ["production version 2"], "KS distance")
    report = replace(
        VALIDATION,
        success=True,
        failures=[],
        checks=[CheckSummary("drift_confidence", False, {"value": 0.31, "max": 0.1}, "warn")],
        warnings=[warned],
        near_duplicates=NearDuplicates(leaks=3, within_split=7, pairs=[]),
        model_drift=ModelDrift(2, 400, 0.31, 0.05, 0.9425, 0.24, per_class=[]),
    )
    rows = validation_table(report)
    assert [(r["check"], r["result"]) for r in rows] == [
        ("drift_confidence", "warn"), ("expect_column_values_to_be_between (confidence_ks)", "warn")
    ]
    assert validation_description(report) == (
        "Data validation passed with 1 warnings: 120 train / 40 test images, content hash abc123;"
        " near duplicates: 3 test images in train, 7 within a split; production version 2 on 400 new test"
        " images: estimated accuracy 0.9425 (measured 0.2400), confidence KS 0.3100, predicted-class TV 0.0500"
    )


def test_metrics_table_has_one_row_per_class_and_a_total() -> None:
    rows = metrics_table(METRICS)
    assert [r["class"] for r in rows] == ["a", "b", "(all)"]
    assert rows[1]["recall"] == 0.25 and rows[2]["f1"] == 0.45 and rows[2]["support"] == 40
    assert metrics_description(METRICS).startswith(
        "Test accuracy 0.5000 on 40 images, macro F1 0.4500; accuracy floor 0.9 FAILED"
    )


def test_floor_markdown_gives_the_numbers_and_says_production_is_unchanged() -> None:
    md = floor_markdown(METRICS)
    assert "| accuracy | 0.5000 | >= 0.9 |" in md
    assert "| min class recall | 0.2500 | >= 0.0 |" in md
    assert "- accuracy 0.5000 < gate.min_accuracy 0.9000" in md and "Production is unchanged." in md


def test_flatten_names_nested_fields_with_dots() -> None:
    parity = {"1": {"max_abs_diff": 1e-7}, "7": {"agreement": 1.0}}
    rows = flatten({"provider_active": "cpu", "parity": parity, "runs": [1, 2]})
    assert rows == [
        {"field": "provider_active", "value": "cpu"},
        {"field": "parity.1.max_abs_diff", "value": 0.0},
        {"field": "parity.7.agreement", "value": 1.0},
        {"field": "runs", "value": "[1, 2]"},
    ]


def test_production_markdown_says_whether_this_run_changed_it() -> None:
    production = ProductionStatus(
        version=3, model_path="/r/m/3/model.onnx", metrics=HeadlineMetrics(0.97, 0.96, 100), promoted_at="t",
        classes=["a"], input=InputContract("image", "uint8", "NCHW", ["batch", 3, 4, 4], 3, 4, "RGB", "raw"),
        provider_verified="cpu", cuda_verified=False, gate="promoted", git_rev=None, data_md5=None,
    )
    status = RegistryStatus(registry="/r/m", production=production, history=[])
    assert production_markdown(status, changed=True).startswith("## Production: version 3 (promoted by this run)")
    assert "(unchanged by this run)" in production_markdown(status, changed=False)
    assert "test accuracy: 0.9700" in production_markdown(status, changed=True)
    empty = replace(status, production=None)
    assert production_markdown(empty, changed=False).startswith("## Production: none")


def test_a_report_older_than_the_stage_run_is_not_published(tmp_path: Path) -> None:
    report = tmp_path / "metrics.json"
    METRICS.write(report)
    os.utime(report, (time.time() - 60, time.time() - 60))
    assert _read(MetricsReport, report, "evaluate", since=time.time()) is None
    assert _read(MetricsReport, report, "evaluate", since=None) == METRICS
    assert _read(MetricsReport, tmp_path / "missing.json", "evaluate", since=None) is None
