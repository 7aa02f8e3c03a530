"""The promotion decision: promoted or not, why, and the numbers behind it (Markdown for people)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.blessing.gate import FloorCheck, PairedComparison
from tasks.errors import GateRejected
from tasks.fs.records import Record, utc_now


@dataclass(frozen=True)
class VerifiedOn(Record):
    """Where the candidate's ONNX model was verified, against what promotion requires."""

    provider_active: str  # cuda | cpu
    cuda_verified: bool
    required: str  # promote.require_provider
    passed: bool


@dataclass(frozen=True)
class PromotionDecision(Record):
    """What promotion decided and why (.visionops/promotion.json, and the card's ``gate``)."""

    promoted: bool
    summary: str
    floor: FloorCheck  # evaluate's floor, as metrics.json recorded it
    verification: VerifiedOn | None  # None when the floor refused the candidate before export
    version: int | None = None  # the new production version when promoted
    production_version: int | None = None  # production when the decision was taken
    first_model: bool = False
    reasons: list[str] = field(default_factory=list)
    candidate_accuracy: float | None = None  # ONNX, on the test split
    production_accuracy: float | None = None
    comparison: PairedComparison | None = None
    decided_at: str = field(default_factory=utc_now)

    def to_markdown(self) -> str:
        verdict = f"promoted as version {self.version}" if self.promoted else "NOT promoted"
        lines = [f"## Promotion decision: {verdict}", "", self.summary, ""]
        if self.first_model:
            lines += [
                "First model in the registry: it faced the absolute floor only (no production to compare with).",
                "",
            ]
        lines += ["| check | value |", "| --- | --- |"]
        lines.append(f"| test accuracy (PyTorch, evaluate) | {self.floor.accuracy:.4f} |")
        lines.append(f"| floor gate.min_accuracy | {self.floor.min_accuracy:.4f} |")
        lines.append(f"| floor passed | {self.floor.passed} |")
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
        if (v := self.verification) is not None:
            lines.append(f"| verified on | {v.provider_active} (required: {v.required}) |")
            lines.append(f"| CUDA verified | {v.cuda_verified} |")
        if self.reasons:
            lines += ["", "Reasons:", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines) + "\n"


class PromotionRejected(GateRejected):
    """The candidate was refused; ``decision`` says why, with its numbers. Exit code 3."""

    def __init__(self, decision: PromotionDecision) -> None:
        super().__init__(decision.summary + ("" if not decision.reasons else ": " + "; ".join(decision.reasons)))
        self.decision = decision
