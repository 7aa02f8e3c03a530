"""Prefect artifacts of a pipeline run, built from the stages' JSON reports.

Each artifact has a fixed key, so the Prefect UI shows its history across runs: the validation
summary, the metrics, the gate decision (with its numbers), the verification and the production
version that resulted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.blessing.reports import MetricsReport, VerificationReport
from tasks.data.reports import ValidationReport
from tasks.fs.records import Record
from tasks.paths import Workspace

if TYPE_CHECKING:
    from tasks.blessing.decision import PromotionDecision
    from tasks.registry.status import RegistryStatus

R = TypeVar("R", bound=Record)

VALIDATION_KEY = "validation-summary"
METRICS_KEY = "metrics"
GATE_KEY = "gate-decision"
VERIFICATION_KEY = "verification"
PRODUCTION_KEY = "production"
EXAMPLES_SHOWN = 3  # example paths per failed expectation


def _read(cls: type[R], path: Path, stage: str, since: float | None) -> R | None:
    """The report at ``path``; None when absent, or older than ``since`` (left by an earlier run)."""
    if not path.is_file() or (since is not None and path.stat().st_mtime < since):
        return None
    return cls.read(path, stage)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value


def flatten(report: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """``{"a": {"b": 1}}`` as rows ``[{"field": "a.b", "value": 1}]``; lists stay one cell."""
    rows: list[dict[str, Any]] = []
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, name + "."))
        else:
            rows.append({"field": name, "value": _cell(value)})
    return rows


def validation_table(report: ValidationReport) -> list[dict[str, Any]]:
    rows = [
        {"check": c.name, "result": "pass" if c.success else "FAIL" if c.action == "fail" else "warn",
         "observed": _cell(c.observed)}
        for c in report.checks
    ]
    for result, failures in (("FAIL", report.failures), ("warn", report.warnings)):
        for failure in failures:
            examples = ", ".join(failure.examples[:EXAMPLES_SHOWN])
            where = failure.column or failure.check
            rows.append(
                {
                    "check": f"{failure.expectation} ({where})" if where else failure.expectation,
                    "result": result,
                    "observed": f"{failure.unexpected_count} unexpected" + (f", e.g. {examples}" if examples else ""),
                }
            )
    return rows


def validation_description(report: ValidationReport) -> str:
    profile = report.data_profile
    verdict = "passed" if report.success else f"FAILED ({len(report.failures)} expectations)"
    if report.warnings:
        verdict += f" with {len(report.warnings)} warnings"
    text = (
        f"Data validation {verdict}: {profile.n_train} train / {profile.n_test} test"
        f" images, content hash {profile.content_hash}"
    )
    if (near := report.near_duplicates) is not None:
        text += f"; near duplicates: {near.leaks} test images in train, {near.within_split} within a split"
    if (seen := report.model_drift) is not None:
        text += (
            f"; production version {seen.production_version} on {seen.scored} new test images: estimated accuracy"
            f" {seen.estimated_accuracy:.4f} (measured {seen.measured_accuracy:.4f}), confidence KS"
            f" {seen.confidence_ks:.4f}, predicted-class TV {seen.prediction_tv:.4f}"
        )
    return text


def metrics_table(report: MetricsReport) -> list[dict[str, Any]]:
    rows = [
        {"class": name, **{k: _cell(v) for k, v in scores.to_json().items()}}
        for name, scores in report.per_class.items()
    ]
    total = {"precision": "", "recall": "", "f1": _cell(report.macro_f1), "support": report.n_test}
    rows.append({"class": "(all)", **total})
    return rows


def metrics_description(report: MetricsReport) -> str:
    gate = report.gate
    floor = "passed" if gate.passed else "FAILED: " + "; ".join(gate.failures)
    return (
        f"Test accuracy {report.accuracy:.4f} on {report.n_test} images,"
        f" macro F1 {report.macro_f1:.4f}; accuracy floor {gate.min_accuracy} {floor}"
    )


def floor_markdown(report: MetricsReport) -> str:
    """The gate decision when the candidate already failed the evaluate floor (promotion never ran)."""
    gate = report.gate
    min_recall = min((c.recall for c in report.per_class.values()), default=float("nan"))
    lines = [
        "## Gate decision: REJECTED at evaluate (accuracy floor)",
        "",
        "| check | value | required |",
        "| --- | --- | --- |",
        f"| accuracy | {report.accuracy:.4f} | >= {gate.min_accuracy} |",
        f"| min class recall | {min_recall:.4f} | >= {gate.min_class_recall} |",
        "",
        *(f"- {failure}" for failure in gate.failures),
        "",
        "Production is unchanged.",
    ]
    return "\n".join(lines)


def _publish_validation(ws: Workspace, since: float | None) -> None:
    if (report := _read(ValidationReport, ws.validation, "validate", since)) is not None:
        create_table_artifact(validation_table(report), key=VALIDATION_KEY, description=validation_description(report))


def _publish_metrics(ws: Workspace, since: float | None) -> None:
    if (report := _read(MetricsReport, ws.metrics, "evaluate", since)) is None:
        return
    create_table_artifact(metrics_table(report), key=METRICS_KEY, description=metrics_description(report))
    if not report.gate.passed:
        create_markdown_artifact(floor_markdown(report), key=GATE_KEY, description="candidate rejected by the floor")


def _publish_verification(ws: Workspace, since: float | None) -> None:
    if (report := _read(VerificationReport, ws.verification, "verify", since)) is None:
        return
    verdict = "passed" if report.passed else "FAILED"
    cuda = "CUDA verified" if report.cuda_verified else "CUDA NOT verified"
    create_table_artifact(
        flatten(report.to_json()),
        key=VERIFICATION_KEY,
        description=f"ONNX verification {verdict} on {report.provider_active} ({cuda})",
    )


_PUBLISHERS: dict[str, Callable[[Workspace, float | None], None]] = {
    "validate": _publish_validation,
    "evaluate": _publish_metrics,
    "verify": _publish_verification,
}


def publish_stage_reports(ws: Workspace, stage: str, since: float | None) -> None:
    """The artifact of ``stage``'s report, if it has one (``since``: only a report this run wrote)."""
    if (publish := _PUBLISHERS.get(stage)) is not None:
        publish(ws, since)


def publish_decision(decision: PromotionDecision) -> None:
    create_markdown_artifact(decision.to_markdown(), key=GATE_KEY, description=decision.summary)


def production_markdown(status: RegistryStatus, changed: bool) -> str:
    production = status.production
    if production is None:
        return "## Production: none\n\nNo model has been promoted in this registry yet."
    return "\n".join(
        [
            f"## Production: version {production.version}"
            + (" (promoted by this run)" if changed else " (unchanged by this run)"),
            "",
            f"- model: `{production.model_path}`",
            f"- test accuracy: {production.metrics.accuracy:.4f}",
        ]
    )


def publish_production(status: RegistryStatus, changed: bool) -> None:
    create_markdown_artifact(production_markdown(status, changed), key=PRODUCTION_KEY, description="production model")
