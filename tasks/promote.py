"""promote: the verified candidate against production on the same test split, then publish or refuse.

Preconditions, checked before the registry is touched: data validation passed, the floor gate
passed (reports/metrics.json), the export was verified (reports/verification.json) on
``promote.require_provider``, and all three describe the files now in models/ and export/.
Then, under the registry lock, the production ONNX model (if any) and the candidate ONNX model
are scored on the same test images and compared (tasks/blessing/gate.py). A rejection raises
`PromotionRejected` (exit 3) and writes nothing into the registry.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from tasks import params
from tasks.blessing.decision import PromotionDecision, PromotionRejected, VerifiedOn
from tasks.blessing.evidence import Evidence, build_card, load_evidence
from tasks.blessing.gate import check_floor, compare_with_production
from tasks.blessing.onnx_session import open_session
from tasks.blessing.reports import InputContract
from tasks.data.prepared import Images, PreparedSplit, load_split
from tasks.entry import run_stage
from tasks.params import GateParams, Params
from tasks.paths import Workspace
from tasks.registry import MODEL_FILE, WEIGHTS_FILE, ProductionInfo, Registry

log = logging.getLogger(__name__)


def precondition_failures(evidence: Evidence, gate: GateParams, require_provider: str) -> list[str]:
    """Why the candidate may not even be compared with production (empty when it may)."""
    failures = []
    if not evidence.validation.success:
        failures.append("data validation failed (reports/validation.json)")
    recorded = evidence.metrics.gate
    # The floor is applied again with today's params: they may have been raised since evaluate ran.
    floor = check_floor(
        evidence.metrics.accuracy, {name: c.recall for name, c in evidence.metrics.per_class.items()}, gate
    )
    if not recorded.passed or not floor.passed:
        reasons = list(dict.fromkeys([*recorded.failures, *floor.failures])) or ["see reports/metrics.json"]
        failures.append("accuracy floor failed: " + "; ".join(reasons))
    v = evidence.verification
    if v is None:  # refused on the floor: no verification was needed or run
        return failures
    if not v.passed:
        failures.append(f"ONNX verification failed: {', '.join(v.failures) or 'see reports/verification.json'}")
    if require_provider != "any" and v.provider_active != require_provider:
        failures.append(
            f"promote.require_provider is {require_provider} but the model was verified on {v.provider_active};"
            f" verify on {require_provider} or set promote.require_provider: {v.provider_active} (or any)"
        )
    return failures


def images_for_contract(images: np.ndarray, contract: InputContract) -> np.ndarray:
    """A batch of test images in another model's input contract (size, channels), through tasks.data.imaging."""
    from tasks.data.imaging import encode_png, to_array

    c, s = contract.channels, contract.image_size
    if images.shape[1:] == (c, s, s):
        return images
    out = np.empty((len(images), c, s, s), dtype=np.uint8)
    for i, img in enumerate(images):
        hwc = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        out[i] = to_array(encode_png(np.ascontiguousarray(hwc)), s, c)
    return out


class ContractImages:
    """The test split seen through a model's input contract: each batch converted as it is read."""

    def __init__(self, images: Images, contract: InputContract) -> None:
        self.images, self.contract = images, contract
        c, s = contract.channels, contract.image_size
        self.shape: tuple[int, ...] = (len(images), c, s, s)
        if tuple(images.shape[1:]) != self.shape[1:]:
            log.info("the model expects %dx%dx%d: converting the test images with tasks.data.imaging", c, s, s)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice, /) -> np.ndarray:
        return images_for_contract(np.asarray(self.images[index]), self.contract)


def correct_by_name(probabilities: np.ndarray, model_classes: list[str], split: PreparedSplit) -> np.ndarray:
    """Per test image, whether the model's top class names the true class (class sets may differ)."""
    predicted = np.asarray(model_classes, dtype=object)[probabilities.argmax(axis=1)]
    actual = np.asarray(split.classes, dtype=object)[split.labels]
    return predicted == actual


def _onnx_probabilities(model: Path, images: Images, contract: InputContract, batch: int) -> np.ndarray:
    """The ONNX model's probabilities on ``images`` in its own contract, scored ``batch`` at a time."""
    return open_session(model, "auto").probabilities(ContractImages(images, contract), batch)


def _decided(ws: Workspace, decision: PromotionDecision) -> PromotionDecision:
    """Record ``decision`` (promoted or not) for the flow's artifact and the next reader."""
    decision.write(ws.promotion_decision)
    return decision


def _refuse(ws: Workspace, decision: PromotionDecision) -> PromotionRejected:
    return PromotionRejected(_decided(ws, decision))


def _admitted(ws: Workspace, registry: Registry, evidence: Evidence, decision: PromotionDecision,
              readmit: bool) -> tuple[PromotionDecision, list[int]]:
    """Refuse a candidate byte-identical to a withdrawn (rolled-back) version unless ``readmit``;
    the decision (noting a re-admission) and the versions it re-admits."""
    assert evidence.export is not None
    withdrawn = registry.withdrawn_holding({evidence.export.sha256, evidence.metrics.candidate_sha256})
    if not withdrawn:
        return decision, []
    named = ", ".join(str(v) for v in withdrawn)
    if not readmit:
        raise _refuse(ws, replace(
            decision,
            production_version=registry.production_version(),
            summary=f"candidate refused: it is withdrawn version {named}",
            reasons=[f"the candidate's model is byte-identical to version {named}, withdrawn by a rollback;"
                     " promote it again only explicitly: `visionops promote --readmit`"],
        ))
    return replace(decision, reasons=[*decision.reasons, f"re-admits withdrawn version {named} (--readmit)"]), withdrawn


def _against_production(registry: Registry, production: ProductionInfo, split: PreparedSplit,
                        candidate_correct: np.ndarray, decision: PromotionDecision, gate: GateParams,
                        batch: int) -> PromotionDecision:
    """The paired comparison on the same test images; the decision (not yet promoted or refused)."""
    prod_export = production.card.export
    production_correct = correct_by_name(
        _onnx_probabilities(
            registry.local_file(production.version, MODEL_FILE), split.images, prod_export.input, batch
        ),
        prod_export.classes,
        split,
    )
    comparison = compare_with_production(candidate_correct, production_correct, gate)
    return replace(
        decision,
        production_version=production.version,
        production_accuracy=float(production_correct.mean()),
        comparison=comparison,
        reasons=[*decision.reasons, comparison.reason],
        summary=f"candidate promoted over production version {production.version}"
        if comparison.passed
        else f"candidate rejected against production version {production.version}",
    )


def promote(p: Params, ws: Workspace, readmit: bool = False) -> PromotionDecision:
    """Promote models/candidate.pt + export/model.onnx, or raise `PromotionRejected` (exit 3).

    ``readmit``: promote it even if its model is byte-identical to a withdrawn (rolled-back) version.
    """
    evidence = load_evidence(ws)
    v = evidence.verification
    decision = PromotionDecision(
        promoted=False,
        summary="",
        floor=evidence.metrics.gate,
        verification=None
        if v is None
        else VerifiedOn(v.provider_active, v.cuda_verified, p.promote.require_provider, v.passed),
    )
    failures = precondition_failures(evidence, p.gate, p.promote.require_provider)
    if failures:
        summary = "candidate refused before comparison with production"
        raise _refuse(ws, replace(decision, summary=summary, reasons=failures))
    assert evidence.export is not None and v is not None  # the floor passed, so export and verify ran

    split = load_split(ws, "test")
    batch = p.registry.max_batch_size
    candidate_correct = correct_by_name(
        _onnx_probabilities(ws.onnx_model, split.images, evidence.export.input, batch),
        evidence.export.classes,
        split,
    )
    decision = replace(decision, candidate_accuracy=float(candidate_correct.mean()))
    registry = Registry.open(ws, p.registry)
    with registry.lock():
        # Read inside the lock: a promotion that finished while we waited is what we must beat.
        production = registry.production()
        decision, readmitted = _admitted(ws, registry, evidence, decision, readmit)
        if production is None:
            decision = replace(
                decision,
                first_model=True,
                summary="first model promoted (floor only)",
                reasons=[
                    *decision.reasons,
                    f"first model: faced the floor only (accuracy {evidence.metrics.accuracy:.4f}"
                    f" >= gate.min_accuracy {p.gate.min_accuracy:.4f})",
                ],
            )
        elif production.card.export.sha256 == evidence.export.sha256:
            log.info("candidate is already production version %d; nothing to do", production.version)
            summary = f"candidate is already production version {production.version}; nothing to do"
            return _decided(ws, replace(decision, production_version=production.version, summary=summary))
        else:
            decision = _against_production(registry, production, split, candidate_correct, decision, p.gate, batch)
            if decision.comparison is not None and not decision.comparison.passed:
                raise _refuse(ws, decision)
        version = registry.next_version()
        decision = replace(
            decision,
            promoted=True,
            version=version,
            summary=decision.summary.replace("promoted", f"promoted as version {version}", 1),
        )
        files = {MODEL_FILE: ws.onnx_model, WEIGHTS_FILE: ws.candidate}
        registry.publish(files, build_card(ws, p, evidence, decision, version, files), readmitted=readmitted)
    if not v.cuda_verified:
        log.warning("version %d was verified on %s: CUDA was NOT verified", version, v.provider_active)
    return _decided(ws, decision)


def main() -> None:
    print(promote(params.load(), Workspace.here()).to_markdown())


if __name__ == "__main__":
    run_stage(main)
