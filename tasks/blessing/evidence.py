"""The evidence a promotion rests on: the stages' reports, checked to describe today's files, and the card.

The card (``<registry>/<model>/<N>/card.json``) keeps every report as it was when version N was
promoted, with the data version, the parameters, the git revision and the decision.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.blessing.decision import PromotionDecision
from tasks.blessing.reports import (
    ExportReport,
    MetricsReport,
    TrainReport,
    VerificationReport,
)
from tasks.data.reports import SourceSummary, ValidationReport
from tasks.errors import DataError
from tasks.fs.hashing import file_digest
from tasks.fs.records import Record, utc_now
from tasks.params import Params
from tasks.paths import Workspace


@dataclass(frozen=True)
class Evidence:
    """Every report promotion relies on. A candidate the floor refused has no export or verification."""

    metrics: MetricsReport
    validation: ValidationReport
    export: ExportReport | None
    verification: VerificationReport | None


def load_evidence(ws: Workspace) -> Evidence:
    """Every report promotion relies on, checked to describe the files in models/ and export/.

    A candidate the floor refused needs no export or verification: those reports may be missing
    or older, and the refusal is the answer.
    """
    if not ws.candidate.is_file():
        raise DataError(f"{ws.candidate} not found: run the pipeline first (visionops run or dvc repro)")
    metrics = MetricsReport.read(ws.metrics, "evaluate")
    validation = ValidationReport.read(ws.validation, "validate")
    candidate_sha = file_digest(ws.candidate)
    if metrics.candidate_sha256 != candidate_sha:
        raise DataError(f"{ws.metrics} was written for another candidate than {ws.candidate}: rerun dvc repro")
    if not metrics.gate.passed:
        return Evidence(metrics, validation, None, None)
    export = ExportReport.read(ws.export_report, "export")
    verification = VerificationReport.read(ws.verification, "verify")
    if not ws.onnx_model.is_file():
        raise DataError(f"{ws.onnx_model} not found: run the pipeline through export (dvc repro)")
    onnx_sha = file_digest(ws.onnx_model)
    stale = [
        str(report)
        for report, ok in (
            (ws.export_report, export.candidate_sha256 == candidate_sha and export.sha256 == onnx_sha),
            (ws.verification, verification.onnx_sha256 == onnx_sha),
        )
        if not ok
    ]
    if stale:
        raise DataError(
            f"{' and '.join(stale)} were written for another candidate than {ws.candidate}:"
            " rerun the pipeline (dvc repro)"
        )
    return Evidence(metrics, validation, export, verification)


@dataclass(frozen=True)
class CardData(Record):
    md5: str | None  # of data/, as data.dvc records it
    source: SourceSummary | None  # data/source.json


@dataclass(frozen=True)
class BuiltFrom(Record):
    """params.yaml, dvc.lock and data.dvc byte for byte as they were when the version was promoted
    (None: the file did not exist): `visionops reproduce N` writes them back."""

    params_yaml: str
    dvc_lock: str | None
    data_dvc: str | None

    FILES = ("params.yaml", "dvc.lock", "data.dvc")

    @classmethod
    def of_workspace(cls, root: Path) -> BuiltFrom:
        texts = []
        for name in cls.FILES:
            path = root / name
            try:
                texts.append(path.read_bytes().decode("utf-8") if path.is_file() else None)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text ({exc}): the card keeps it as text") from exc
        params_yaml, dvc_lock, data_dvc = texts
        if params_yaml is None:
            raise DataError(f"{root / 'params.yaml'} not found")
        return cls(params_yaml, dvc_lock, data_dvc)

    def texts(self) -> dict[str, str | None]:
        """File name -> its text (None: it did not exist)."""
        return dict(zip(self.FILES, (self.params_yaml, self.dvc_lock, self.data_dvc), strict=True))


@dataclass(frozen=True)
class Card(Record):
    """card.json of one registry version: the evidence it was promoted on, as it was.

    Fields added later have defaults, so cards written before them stay readable.
    """

    version: int
    model_name: str
    promoted_at: str
    classes: list[str]  # index = output position of the ONNX model
    files: dict[str, str]  # file name in the version folder -> sha256
    data: CardData
    validation: ValidationReport
    params: dict[str, Any]  # params.yaml as parsed for the run
    git_rev: str | None
    training: TrainReport | None
    metrics: MetricsReport
    export: ExportReport
    verification: VerificationReport
    gate: PromotionDecision
    built_from: BuiltFrom | None = None  # None on cards written before it existed


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


def build_card(
    ws: Workspace,
    params: Params,
    evidence: Evidence,
    decision: PromotionDecision,
    version: int,
    files: dict[str, Path],
) -> Card:
    """The card of ``version``, holding ``files`` (name -> local path, hashed here)."""
    from tasks.data.versioning import tracked_md5

    if evidence.export is None or evidence.verification is None:
        raise AssertionError("only a verified candidate gets a card")
    return Card(
        version=version,
        model_name=params.registry.model_name,
        promoted_at=utc_now(),
        classes=evidence.export.classes,
        files={name: file_digest(path) for name, path in files.items()},
        data=CardData(
            md5=tracked_md5(ws.root / "data.dvc"),
            source=SourceSummary.read(ws.data_source, "ingest") if ws.data_source.is_file() else None,
        ),
        validation=evidence.validation,
        params=params.to_dict(),
        git_rev=git_rev(ws.root),
        training=TrainReport.read(ws.train_summary, "train") if ws.train_summary.is_file() else None,
        metrics=evidence.metrics,
        export=evidence.export,
        verification=evidence.verification,
        gate=decision,
        built_from=BuiltFrom.of_workspace(ws.root),
    )
