"""What `visionops status --json` prints: the production version with its evidence, and recent history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.blessing.evidence import Card
from tasks.blessing.reports import InputContract
from tasks.fs.records import Record


@dataclass(frozen=True)
class HeadlineMetrics(Record):
    accuracy: float
    macro_f1: float
    n_test: int


@dataclass(frozen=True)
class ProductionStatus(Record):
    version: int
    model_path: str  # local path or fsspec URL of <N>/model.onnx
    metrics: HeadlineMetrics
    promoted_at: str
    classes: list[str]
    input: InputContract
    provider_verified: str  # the onnxruntime provider it was verified on
    cuda_verified: bool
    gate: str  # the promotion decision's summary
    git_rev: str | None
    data_md5: str | None

    @classmethod
    def of(cls, card: Card, model_path: str) -> ProductionStatus:
        return cls(
            version=card.version,
            model_path=model_path,
            metrics=HeadlineMetrics(card.metrics.accuracy, card.metrics.macro_f1, card.metrics.n_test),
            promoted_at=card.promoted_at,
            classes=card.classes,
            input=card.export.input,
            provider_verified=card.verification.provider_active,
            cuda_verified=card.verification.cuda_verified,
            gate=card.gate.summary,
            git_rev=card.git_rev,
            data_md5=card.data.md5,
        )


@dataclass(frozen=True)
class RegistryStatus(Record):
    registry: str  # where the registry is (local path or URL of the model's folder)
    production: ProductionStatus | None  # None before the first promotion
    history: list[dict[str, Any]]  # the most recent events, oldest first
