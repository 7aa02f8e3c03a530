"""promote: the verified candidate against production on the same test split, then publish or refuse.

Preconditions, checked before the registry is touched: data validation passed, the floor gate
passed (reports/metrics.json), the export was verified (reports/verification.json) on
``promote.require_provider``, and all three describe the files now in models/ and export/.
Then, under the registry lock, the production ONNX model (if any) and the candidate ONNX model
are scored on the same test images and compared (tasks/gate.py). A rejection raises
`PromotionRejected` (exit 3) and writes nothing into the registry.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.atomic import atomic_write_json
from tasks.downloads import file_digest
from tasks.errors import DataError, GateRejected
from tasks.gate import PairedComparison, check_floor, compare_with_production
from tasks.params import GateParams, Params
from tasks.paths import Workspace
from tasks.prepared import PreparedSplit, load_split
from tasks.registry import MODEL_FILE, WEIGHTS_FILE, Registry, now
from tasks.runtime import open_session

log = logging.getLogger(__name__)


@dataclass
class PromotionDecision:
    promoted: bool
    summary: str
    version: int | None = None  # the new production version when promoted
    production_version: int | None = None  # production when the decision was taken
    first_model: bool = False
    reasons: list[str] = field(default_factory=list)
    floor: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    candidate_accuracy: float | None = None  # ONNX, on the test split
    production_accuracy: float | None = None
    comparison: PairedComparison | None = None
    decided_at: str = field(default_factory=now)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["comparison"] = self.comparison.to_dict() if self.comparison else None
        return d

    def to_markdown(self) -> str:
        verdict = f"promoted as version {self.version}" if self.promoted else "NOT promoted"
        lines = [f"## Promotion decision: {verdict}", "", self.summary, ""]
        if self.first_model:
            lines += [
                "First model in the registry: it faced the absolute floor only (no production to compare with).",
                "",
            ]
        lines += ["| check | value |", "| --- | --- |"]
        if self.floor:
            lines.append(f"| test accuracy (PyTorch, evaluate) | {self.floor.get('accuracy', float('nan')):.4f} |")
            lines.append(f"| floor gate.min_accuracy | {self.floor.get('min_accuracy', float('nan')):.4f} |")
            lines.append(f"| floor passed | {self.floor.get('passed')} |")
        if self.candidate_accuracy is not None:
            lines.append(f"| candidate accuracy (ONNX) | {self.candidate_accuracy:.4f} |")
        if self.production_version is not None:
            lines.append(f"| production version | {self.production_version} |")
        if self.production_accuracy is not None:
            lines.append(f"| production accuracy (ONNX, same images) | {self.production_accuracy:.4f} |")
        c = self.comparison
        if c is not None:
            lines += [
                f"| difference (candidate - production) | {c.difference:+.4f} |",
                f"| images improved / regressed | {c.improvements} / {c.regressions} of {c.n_images} |",
                f"| exact McNemar p (candidate worse) | {c.p_value:.4g} |",
                f"| gate.max_regression / gate.confidence | {c.max_regression} / {c.confidence} |",
            ]
        if self.verification:
            v = self.verification
            lines.append(f"| verified on | {v.get('provider_active')} (required: {v.get('required')}) |")
            lines.append(f"| CUDA verified | {v.get('cuda_verified')} |")
        if self.reasons:
            lines += ["", "Reasons:", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines) + "\n"


class PromotionRejected(GateRejected):
    """The candidate was refused; ``decision`` says why, with its numbers. Exit code 3."""

    def __init__(self, decision: PromotionDecision) -> None:
        super().__init__(decision.summary + ("" if not decision.reasons else ": " + "; ".join(decision.reasons)))
        self.decision = decision


@dataclass(frozen=True)
class Evidence:
    metrics: dict[str, Any]
    export: dict[str, Any]
    verification: dict[str, Any]
    validation: dict[str, Any]


def _read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} not found: run the pipeline through {stage} first (visionops run or dvc repro)")
    return json.loads(path.read_text())


def load_evidence(ws: Workspace) -> Evidence:
    """Every report promotion relies on, checked to describe the files in models/ and export/.

    A candidate the floor refused needs no export or verification: those reports may be missing
    or older, and the refusal is the answer.
    """
    if not ws.candidate_weights.is_file():
        raise DataError(f"{ws.candidate_weights} not found: run the pipeline first (visionops run or dvc repro)")
    metrics = _read_json(ws.metrics, "evaluate")
    validation = _read_json(ws.validation, "validate")
    candidate_sha = file_digest(ws.candidate_weights)
    if metrics.get("candidate_sha256") != candidate_sha:
        raise DataError(f"{ws.metrics} was written for another candidate than {ws.candidate_weights}: rerun dvc repro")
    if not metrics.get("gate", {}).get("passed", False):
        return Evidence(metrics, {}, {}, validation)
    export = _read_json(ws.export_report, "export")
    verification = _read_json(ws.verification, "verify")
    if not ws.onnx_model.is_file():
        raise DataError(f"{ws.onnx_model} not found: run the pipeline through export (dvc repro)")
    onnx_sha = file_digest(ws.onnx_model)
    stale = [
        str(report)
        for report, ok in (
            (ws.export_report, export.get("candidate_sha256") == candidate_sha and export.get("sha256") == onnx_sha),
            (ws.verification, verification.get("onnx_sha256") == onnx_sha),
        )
        if not ok
    ]
    if stale:
        raise DataError(
            f"{' and '.join(stale)} were written for another candidate than {ws.candidate_weights}:"
            " rerun the pipeline (dvc repro)"
        )
    return Evidence(metrics, export, verification, validation)


def precondition_failures(evidence: Evidence, gate: GateParams, require_provider: str) -> list[str]:
    """Why the candidate may not even be compared with production (empty when it may)."""
    failures = []
    if not evidence.validation.get("success", False):
        failures.append("data validation failed (reports/validation.json)")
    recorded = evidence.metrics.get("gate", {})
    # The floor is applied again with today's params: they may have been raised since evaluate ran.
    floor = check_floor(
        float(evidence.metrics.get("accuracy", 0.0)),
        {name: c["recall"] for name, c in evidence.metrics.get("per_class", {}).items()},
        gate,
    )
    if not recorded.get("passed", False) or not floor.passed:
        reasons = list(dict.fromkeys([*recorded.get("failures", []), *floor.failures])) or ["see reports/metrics.json"]
        failures.append("accuracy floor failed: " + "; ".join(reasons))
    if not evidence.verification:  # refused on the floor: no verification was needed or run
        return failures
    v = evidence.verification
    if not v.get("passed", False):
        failures.append(
            f"ONNX verification failed: {', '.join(v.get('failures', [])) or 'see reports/verification.json'}"
        )
    active = v.get("provider_active")
    if require_provider != "any" and active != require_provider:
        failures.append(
            f"promote.require_provider is {require_provider} but the model was verified on {active};"
            f" verify on {require_provider} or set promote.require_provider: {active} (or any)"
        )
    return failures


def images_for_contract(split: PreparedSplit, contract: dict[str, Any]) -> np.ndarray:
    """The test images in another model's input contract (size, channels), through tasks.imaging."""
    from tasks.imaging import encode_png, to_array

    c, s = int(contract["channels"]), int(contract["image_size"])
    if split.images.shape[1:] == (c, s, s):
        return split.images
    log.info("production expects %dx%dx%d: converting the test images with tasks.imaging", c, s, s)
    out = np.empty((len(split.images), c, s, s), dtype=np.uint8)
    for i, img in enumerate(split.images):
        hwc = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        out[i] = to_array(encode_png(np.ascontiguousarray(hwc)), s, c)
    return out


def correct_by_name(probabilities: np.ndarray, model_classes: list[str], split: PreparedSplit) -> np.ndarray:
    """Per test image, whether the model's top class names the true class (class sets may differ)."""
    predicted = np.asarray(model_classes, dtype=object)[probabilities.argmax(axis=1)]
    actual = np.asarray(split.classes, dtype=object)[split.labels]
    return predicted == actual


def git_rev(root: Path) -> str | None:
    """HEAD of the workspace, with ``-dirty`` when tracked files differ from it; None outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def build_card(ws: Workspace, params: Params, evidence: Evidence, decision: PromotionDecision) -> dict[str, Any]:
    from tasks.versioning import tracked_md5

    source = json.loads(ws.data_source.read_text()) if ws.data_source.is_file() else None
    train = json.loads(ws.train_summary.read_text()) if ws.train_summary.is_file() else None
    return {
        "promoted_at": now(),
        "classes": evidence.export["classes"],
        "data": {
            "md5": tracked_md5(ws.root / "data.dvc"),
            "source": source,
            "data_profile": evidence.validation.get("data_profile"),
        },
        "validation": {"success": evidence.validation.get("success"), "checks": evidence.validation.get("checks")},
        "params": params.to_dict(),
        "git_rev": git_rev(ws.root),
        "metrics": evidence.metrics,
        "training": train,
        "gate": {"summary": decision.summary, **decision.to_dict()},
        "verification": evidence.verification,
        "export": evidence.export,
    }


def _onnx_probabilities(model: Path, images: np.ndarray, batch: int) -> np.ndarray:
    return open_session(model, "auto").probabilities(images, batch)


def _record(ws: Workspace, decision: PromotionDecision) -> None:
    atomic_write_json(ws.promotion_decision, decision.to_dict())


def promote(ws: Workspace, params: Params) -> PromotionDecision:
    """Promote models/candidate.pt + export/model.onnx, or raise `PromotionRejected` (exit 3)."""
    evidence = load_evidence(ws)
    v = evidence.verification
    decision = PromotionDecision(
        promoted=False,
        summary="",
        floor={**evidence.metrics.get("gate", {}), "accuracy": evidence.metrics.get("accuracy")},
        verification={
            "provider_active": v.get("provider_active"),
            "cuda_verified": bool(v.get("cuda_verified")),
            "required": params.promote.require_provider,
            "passed": v.get("passed"),
        },
    )
    failures = precondition_failures(evidence, params.gate, params.promote.require_provider)
    if failures:
        decision.summary = "candidate refused before comparison with production"
        decision.reasons = failures
        _record(ws, decision)
        raise PromotionRejected(decision)

    split = load_split(ws, "test")
    batch = params.registry.max_batch_size
    candidate_correct = correct_by_name(
        _onnx_probabilities(ws.onnx_model, images_for_contract(split, evidence.export["input"]), batch),
        evidence.export["classes"],
        split,
    )
    decision.candidate_accuracy = float(candidate_correct.mean())
    registry = Registry.open(ws, params.registry)
    with registry.lock():
        # Read inside the lock: a promotion that finished while we waited is what we must beat.
        production = registry.production()
        if production is None:
            decision.first_model = True
            floor_only = (
                f"first model: faced the floor only (accuracy {evidence.metrics['accuracy']:.4f}"
                f" >= gate.min_accuracy {params.gate.min_accuracy:.4f})"
            )
            decision.reasons = [floor_only]
        elif production.card["export"]["sha256"] == evidence.export["sha256"]:
            decision.production_version = production.version
            decision.summary = f"candidate is already production version {production.version}; nothing to do"
            _record(ws, decision)
            log.info(decision.summary)
            return decision
        else:
            decision.production_version = production.version
            prod_contract = production.card["export"]
            prod_probs = _onnx_probabilities(
                registry.local_file(production.version, MODEL_FILE),
                images_for_contract(split, prod_contract["input"]),
                batch,
            )
            production_correct = correct_by_name(prod_probs, prod_contract["classes"], split)
            decision.production_accuracy = float(production_correct.mean())
            decision.comparison = compare_with_production(candidate_correct, production_correct, params.gate)
            decision.reasons = [decision.comparison.reason]
            if not decision.comparison.passed:
                decision.summary = f"candidate rejected against production version {production.version}"
                _record(ws, decision)
                raise PromotionRejected(decision)
        decision.promoted = True
        decision.summary = (
            "first model promoted (floor only)"
            if decision.first_model
            else f"candidate promoted over production version {production.version}"
        )
        card = build_card(ws, params, evidence, decision)
        decision.version = registry.publish(
            {MODEL_FILE: ws.onnx_model, WEIGHTS_FILE: ws.candidate_weights},
            card,
            history={
                "accuracy": decision.candidate_accuracy,
                "production_accuracy": decision.production_accuracy,
                "provider_verified": v.get("provider_active"),
                "decision": decision.summary,
            },
        )
    decision.summary = decision.summary.replace("promoted", f"promoted as version {decision.version}", 1)
    _record(ws, decision)
    if not v.get("cuda_verified"):
        log.warning("version %d was verified on %s: CUDA was NOT verified", decision.version, v.get("provider_active"))
    return decision


def _main() -> None:
    from tasks import params

    decision = promote(Workspace.here(), params.load())
    print(decision.to_markdown())


if __name__ == "__main__":
    from tasks.entry import run_stage

    run_stage(_main)
