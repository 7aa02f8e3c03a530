"""validate: enforce the image-data contract (Great Expectations suites) on prepared/.

Writes reports/validation.json (DVC metrics) and the Data Docs (reports/data_docs/) in every
case; when any check fails, raises :class:`ValidationFailed` listing every failed expectation with
counts and example paths, so the pipeline stops before training.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tasks import params
from tasks.data import swap
from tasks.data.contract import ContractInputs
from tasks.data.drift import data_profile, drift_checks
from tasks.data.reports import (
    CheckResult,
    CheckSummary,
    DataProfile,
    DriftStatus,
    PrepareReport,
    ValidationFailure,
    ValidationReport,
)
from tasks.entry import StageSpec, run_stage
from tasks.errors import DataError, ValidationFailed
from tasks.params import DataParams, RegistryParams, ValidateParams
from tasks.paths import SPLITS, Workspace

log = logging.getLogger(__name__)


def read_manifest(ws: Workspace) -> pd.DataFrame:
    if not ws.manifest.is_file():
        raise DataError(f"{ws.manifest} not found: run prepare first (`dvc repro prepare`)")
    return pd.read_parquet(ws.manifest)


def _tensor_row(ws: Workspace, split: str, decoded: int) -> dict[str, Any]:
    images = np.load(ws.images(split), mmap_mode="r", allow_pickle=False)
    labels = np.load(ws.labels(split), mmap_mode="r", allow_pickle=False)
    shape = images.shape if images.ndim == 4 else (images.shape[0] if images.ndim else 0, -1, -1, -1)
    return {
        "split": split,
        "rows": int(shape[0]),
        "channels": int(shape[1]),
        "height": int(shape[2]),
        "width": int(shape[3]),
        "dtype": str(images.dtype),
        "label_dtype": str(labels.dtype),
        "label_rows": int(labels.shape[0]) if labels.ndim == 1 else -1,
        "decoded": decoded,
    }


def contract_inputs(ws: Workspace, manifest: pd.DataFrame) -> ContractInputs:
    """The frames the suites run on, derived from the manifest and the tensor files."""
    train = manifest[manifest["split"] == "train"]
    test = manifest[manifest["split"] == "test"].copy()
    twins = train.dropna(subset=["content_hash"]).drop_duplicates("content_hash").set_index("content_hash")["path"]
    test["train_twin"] = test["content_hash"].map(twins)  # NaN unless a train image has the same pixels
    train_classes = sorted(train["class_name"].unique().tolist())
    all_classes = sorted(manifest["class_name"].unique().tolist())
    rows = []
    for split in SPLITS:
        counts = manifest[manifest["split"] == split]["class_name"].value_counts()
        largest = int(counts.max()) if len(counts) else 0
        for name in all_classes:
            count = int(counts.get(name, 0))
            rows.append(
                {"class": f"{split}/{name}", "split": split, "class_name": name, "count": count,
                 "largest_over_this": largest / max(count, 1)}
            )
    decoded = manifest[manifest["decoded"]].groupby("split").size()
    tensors = pd.DataFrame([_tensor_row(ws, split, int(decoded.get(split, 0))) for split in SPLITS])
    return ContractInputs(
        images=manifest, test_images=test, classes=pd.DataFrame(rows), tensors=tensors, train_classes=train_classes
    )


def _production_profile(ws: Workspace, p: RegistryParams) -> tuple[DataProfile | None, str]:
    """Production's data profile, or None and why drift cannot be checked."""
    from tasks.registry import Registry

    card = Registry.open(ws, p).production_card()
    if card is None:
        return None, "drift not checked: there is no production model yet"
    return card.validation.data_profile, "drift checked against the production model's training data"


def _failure(check: CheckResult) -> ValidationFailure:
    return ValidationFailure(
        expectation=check.expectation or check.name,
        check=check.name,
        column=check.column,
        unexpected_count=check.unexpected_count,
        examples=check.examples,
        message=check.message,
    )


def failure_lines(failures: list[ValidationFailure]) -> list[str]:
    lines = []
    for f in failures:
        what = f"{f.check} ({f.expectation} on {f.column})" if f.column else f.check
        examples = f"; e.g. {', '.join(f.examples)}" if f.examples else ""
        lines.append(f"- {what}: {f.unexpected_count} unexpected: {f.message}{examples}")
    return lines


@dataclass(frozen=True)
class ValidateSections:
    """The params.yaml sections validate reads."""

    data: DataParams
    validate: ValidateParams
    registry: RegistryParams


SPEC = StageSpec(
    "validate",
    params=("data.image_size", "data.channels", "validate", "registry.uri", "registry.model_name"),
    reads=lambda ws: [
        ws.manifest,
        ws.prepare_report,
        *(path for split in SPLITS for path in (ws.images(split), ws.labels(split))),
    ],
    writes=lambda ws: [ws.data_docs, ws.validation],
    # The registry's production.json names the production version: drift is measured against its
    # data, so a promotion or rollback re-runs validate (a local path, or an S3 URL DVC checks by ETag).
    external=("${registry.uri}/${registry.model_name}/production.json",),
)


def validate(p: ValidateSections, ws: Workspace) -> ValidationReport:
    """Run the contract on prepared/; the validation report, or :class:`ValidationFailed`."""
    started = time.perf_counter()
    from tasks.data import contract as data_contract

    data_contract.import_gx()
    imported = time.perf_counter()
    manifest = read_manifest(ws)
    inputs = contract_inputs(ws, manifest)
    if ws.data_docs.exists():
        shutil.rmtree(ws.data_docs)  # Data Docs of earlier runs would list stale results
    checks = data_contract.run(p.validate, p.data.image_size, p.data.channels, inputs, ws.data_docs)
    profile = data_profile(manifest)
    production, drift_message = _production_profile(ws, p.registry)
    if production is not None:
        for d in drift_checks(profile, production, p.validate.drift):
            checks.append(
                CheckResult(d.name, d.success, {"value": d.observed, "max": d.threshold},
                            unexpected_count=0 if d.success else 1, message=d.message)
            )
    log.info(drift_message)
    failures = [_failure(c) for c in checks if not c.success]
    report = ValidationReport(
        success=not failures,
        failures=failures,
        checks=[CheckSummary(c.name, c.success, c.observed) for c in checks],
        data_profile=profile,
        drift=DriftStatus(checked=production is not None, message=drift_message),
        counts=PrepareReport.read(ws.prepare_report, "prepare").counts,
        data_docs=str((ws.data_docs / "index.html").relative_to(ws.root)),
        details=checks,
    )
    report.write(ws.validation)
    log.info("validated %d images with %d checks in %.1f s (+ %.1f s importing Great Expectations); Data Docs: %s",
             len(manifest), len(checks), time.perf_counter() - imported, imported - started, report.data_docs)
    if failures:
        raise ValidationFailed(
            f"data validation failed: {len(failures)} of {len(checks)} checks\n" + "\n".join(failure_lines(failures))
            + f"\nsee {ws.validation} and {ws.data_docs / 'index.html'}"
        )
    return report


def main() -> None:
    ws = Workspace.here()
    try:
        validate(params.sections(ValidateSections, params.load()), ws)
    except ValidationFailed as exc:
        # A rejected dataset must not stay current: put back the version ingest kept (tasks/data/swap.py).
        put_back = swap.settle(ws, passed=False, validated_content=_prepared_from(ws))
        if put_back is None:
            raise
        raise ValidationFailed(f"{exc}\n{put_back}; rerun `visionops run` or `dvc repro`") from exc
    swap.settle(ws, passed=True, validated_content=_prepared_from(ws))


def _prepared_from(ws: Workspace) -> str:
    """The content hash of the data/ that prepared/ was made from."""
    return PrepareReport.read(ws.prepare_report, "prepare").data_content_sha256


if __name__ == "__main__":
    run_stage(main)
