"""Prefect artifacts of a pipeline run, built from the stages' JSON reports.

Each artifact has a fixed key, so the Prefect UI shows its history across runs: the validation
summary, the metrics, the gate decision (with its numbers), the verification and the production
version that resulted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.paths import Workspace

if TYPE_CHECKING:
    from tasks.promote import PromotionDecision

VALIDATION_KEY = "validation-summary"
METRICS_KEY = "metrics"
GATE_KEY = "gate-decision"
VERIFICATION_KEY = "verification"
PRODUCTION_KEY = "production"
EXAMPLES_SHOWN = 3  # example paths per failed expectation


def _read(path: Path, since: float | None) -> dict[str, Any] | None:
    """The report at ``path``; None when absent, or older than ``since`` (left by an earlier run)."""
    if not path.is_file() or (since is not None and path.stat().st_mtime < since):
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


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


def validation_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"check": c.get("name"), "result": "pass" if c.get("success") else "FAIL", "observed": _cell(c.get("observed"))}
        for c in report.get("checks", [])
    ]
    for failure in report.get("failures", []):
        examples = ", ".join(str(e) for e in (failure.get("examples") or [])[:EXAMPLES_SHOWN])
        where = failure.get("column") or failure.get("check") or ""
        rows.append(
            {
                "check": f"{failure.get('expectation')} ({where})" if where else failure.get("expectation"),
                "result": "FAIL",
                "observed": f"{failure.get('unexpected_count')} unexpected" + (f", e.g. {examples}" if examples else ""),
            }
        )
    return rows


def validation_description(report: dict[str, Any]) -> str:
    profile = report.get("data_profile") or {}
    verdict = "passed" if report.get("success") else f"FAILED ({len(report.get('failures', []))} expectations)"
    return (
        f"Data validation {verdict}: {profile.get('n_train', '?')} train / {profile.get('n_test', '?')} test"
        f" images, content hash {profile.get('content_hash', '?')}"
    )


def metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        {"class": name, **{k: _cell(v) for k, v in scores.items()}}
        for name, scores in (report.get("per_class") or {}).items()
    ]
    rows.append({"class": "(all)", "precision": "", "recall": "", "f1": _cell(report.get("macro_f1")), "support": report.get("n_test")})
    return rows


def metrics_description(report: dict[str, Any]) -> str:
    gate = report.get("gate") or {}
    floor = "passed" if gate.get("passed") else "FAILED: " + "; ".join(gate.get("failures", []))
    return (
        f"Test accuracy {report.get('accuracy', float('nan')):.4f} on {report.get('n_test')} images,"
        f" macro F1 {report.get('macro_f1', float('nan')):.4f}; accuracy floor {gate.get('min_accuracy')} {floor}"
    )


def floor_markdown(report: dict[str, Any]) -> str:
    """The gate decision when the candidate already failed the evaluate floor (promotion never ran)."""
    gate = report.get("gate") or {}
    lines = [
        "## Gate decision: REJECTED at evaluate (accuracy floor)",
        "",
        "| check | value | required |",
        "| --- | --- | --- |",
        f"| accuracy | {report.get('accuracy', float('nan')):.4f} | >= {gate.get('min_accuracy')} |",
        f"| min class recall | {min((c.get('recall', 0.0) for c in (report.get('per_class') or {}).values()), default=float('nan')):.4f}"
        f" | >= {gate.get('min_class_recall')} |",
        "",
        *(f"- {failure}" for failure in gate.get("failures", [])),
        "",
        "Production is unchanged.",
    ]
    return "\n".join(lines)


def _publish_validation(ws: Workspace, since: float | None) -> None:
    if (report := _read(ws.validation, since)) is not None:
        create_table_artifact(validation_table(report), key=VALIDATION_KEY, description=validation_description(report))


def _publish_metrics(ws: Workspace, since: float | None) -> None:
    if (report := _read(ws.metrics, since)) is None:
        return
    create_table_artifact(metrics_table(report), key=METRICS_KEY, description=metrics_description(report))
    if not (report.get("gate") or {}).get("passed", True):
        create_markdown_artifact(floor_markdown(report), key=GATE_KEY, description="candidate rejected by the floor")


def _publish_verification(ws: Workspace, since: float | None) -> None:
    if (report := _read(ws.verification, since)) is None:
        return
    verdict = "passed" if report.get("passed") else "FAILED"
    cuda = "CUDA verified" if report.get("cuda_verified") else "CUDA NOT verified"
    create_table_artifact(
        flatten(report),
        key=VERIFICATION_KEY,
        description=f"ONNX verification {verdict} on {report.get('provider_active')} ({cuda})",
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


def production_markdown(status: dict[str, Any], changed: bool) -> str:
    production = status.get("production")
    if production is None:
        return "## Production: none\n\nNo model has been promoted in this registry yet."
    accuracy = (production.get("metrics") or {}).get("accuracy")
    return "\n".join(
        [
            f"## Production: version {production.get('version')}"
            + (" (promoted by this run)" if changed else " (unchanged by this run)"),
            "",
            f"- model: `{production.get('model_path')}`",
            f"- test accuracy: {accuracy:.4f}" if isinstance(accuracy, float) else "- test accuracy: unknown",
        ]
    )


def publish_production(status: dict[str, Any], changed: bool) -> None:
    create_markdown_artifact(production_markdown(status, changed), key=PRODUCTION_KEY, description="production model")
