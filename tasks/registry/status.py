"""What `visionops status` prints (production with its evidence, recent history) and what
`visionops status --check` finds (every version's files against the history)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tasks.blessing.evidence import Card
from tasks.blessing.reports import InputContract
from tasks.fs.records import Record
from tasks.registry.history import HistoryEvent


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
    integrity: str = "not checked"  # what was checked against the history when this was read

    @classmethod
    def of(cls, card: Card, model_path: str, integrity: str) -> ProductionStatus:
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
            integrity=integrity,
        )


@dataclass(frozen=True)
class RegistryStatus(Record):
    registry: str  # where the registry is (local path or URL of the model's folder)
    production: ProductionStatus | None  # None before the first promotion
    history: list[HistoryEvent]  # the most recent events, oldest first
    withdrawn: list[int] = field(default_factory=list)  # rolled back, not promoted again unless re-admitted


@dataclass(frozen=True)
class ProductionMarker(Record):
    """<model>/production.json: names the production version; validate's DVC dependency, so
    `dvc repro` and the flow re-run validate (drift against production) when production changes."""

    version: int | None
    model_sha256: str | None


VersionState = Literal["production", "activated", "withdrawn", "never activated"]


@dataclass(frozen=True)
class VersionAudit(Record):
    version: int
    state: VersionState
    ok: bool
    detail: str


@dataclass(frozen=True)
class RegistryAudit(Record):
    """`visionops status --check`: every version's files against the sha256 the history recorded."""

    registry: str
    events: int
    production: int | None
    versions: list[VersionAudit]
    problems: list[str]  # registry-wide: the pointer against the history, the labels pairing

    @property
    def ok(self) -> bool:
        return not self.problems and all(v.ok for v in self.versions)
