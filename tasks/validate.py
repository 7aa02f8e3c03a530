"""validate: enforce the image-data contract (Great Expectations suites) on prepared/.

Writes reports/validation.json (DVC metrics) and the Data Docs (reports/data_docs/) in every
case; when any check fails, raises :class:`ValidationFailed` listing every failed expectation with
counts and example paths, so the pipeline stops before training. A failed check whose
``validate.drift.actions`` entry is warn is reported (``warnings``) and the run goes on.
When there is a production model, it scores the new test split, and its view of the new data is
checked beside the pixel statistics (tasks/blessing/confidence.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tasks import params
from tasks.data import near_duplicates, swap
from tasks.data.contract import ContractInputs
from tasks.data.drift import data_profile, drift_checks
from tasks.data.reports import (
    CheckResult,
    CheckSummary,
    DriftStatus,
    PrepareReport,
    ValidationFailure,
    ValidationReport,
)
from tasks.entry import StageSpec, run_stage
from tasks.errors import DataError, ValidationFailed
from tasks.params import DataParams, RegistryParams, ValidateParams
from tasks.paths import SPLITS, Workspace

if TYPE_CHECKING:
    from tasks.blessing.confidence import ProductionView
    from tasks.registry import ProductionInfo, Registry

log = logging.getLogger(__name__)


def read_manifest(ws: Workspace) -> pd.DataFrame:
    if not ws.manifest.is_file():
        raise DataError(f"{ws.manifest} not found: run prepare first (`dvc repro prepare`)")
    manifest = pd.read_parquet(ws.manifest)
    if "phash" not in manifest.columns:
        raise DataError(f"{ws.manifest} has no perceptual hashes (an older prepare wrote it): rerun prepare")
    return manifest


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


def contract_inputs(
    ws: Workspace,
    manifest: pd.DataFrame,
    near: near_duplicates.NearDuplicateColumns,
    production: ProductionView | None = None,
) -> ContractInputs:
    """The frames the suites run on, derived from the manifest, the tensor files and production's scores."""
    train = manifest[manifest["split"] == "train"]
    test = manifest[manifest["split"] == "test"].copy()
    twins = train.dropna(subset=["content_hash"]).drop_duplicates("content_hash").set_index("content_hash")["path"]
    test["train_twin"] = test["content_hash"].map(twins)  # NaN unless a train image has the same pixels
    test["train_near_twin"] = near.train_twin  # None unless a train image is a confirmed near duplicate
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
        images=manifest.assign(near_twin=near.within_split),
        test_images=test,
        classes=pd.DataFrame(rows),
        tensors=tensors,
        train_classes=train_classes,
        scored=None if production is None else production.scored,
        model_drift=None if production is None else _model_drift_frame(production),
    )


def _model_drift_frame(view: ProductionView) -> pd.DataFrame:
    """One row: production's two-sample tests on the new data (their p-values decide when the bounds apply)."""
    return pd.DataFrame([{
        "production": f"production version {view.drift.production_version}",
        "confidence_ks": view.confidence.distance,
        "confidence_ks_p_value": view.confidence.p_value,
        "prediction_tv": view.predictions.distance,
        "prediction_tv_p_value": view.predictions.p_value,
        "atc_threshold": view.profile.atc_threshold,
        "production_accuracy": view.profile.accuracy,
    }])


def _production_view(
    ws: Workspace, p: ValidateSections, registry: Registry, production: ProductionInfo, manifest: pd.DataFrame
) -> tuple[ProductionView | None, str]:
    """Production's scores on the new test split against its card's profile, or None and why not."""
    from tasks.blessing import confidence
    from tasks.data.imaging import conform
    from tasks.registry import MODEL_FILE

    card, version = production.card, production.version
    if card.confidence is None:
        return None, f"not checked by the model: version {version}'s card has no confidence profile (older visionops)"
    test = manifest[(manifest["split"] == "test") & manifest["decoded"]].sort_values("index")
    if test.empty:
        return None, "not checked by the model: no decoded test image to score"
    sample = test.iloc[confidence.sample_rows(len(test), p.validate.drift.max_scored_images)]
    images = np.load(ws.images("test"), mmap_mode="r", allow_pickle=False)
    contract = card.export.input
    pixels = conform(np.asarray(images[sample["index"].to_numpy()]), contract.channels, contract.image_size)
    probabilities = confidence.score(registry.local_file(version, MODEL_FILE), pixels, p.registry.max_batch_size)
    view = confidence.view(probabilities, card.classes, card.confidence, version, sample["path"].tolist(),
                           sample["class_name"].tolist())
    return view, f"production version {version} scored {len(sample)} new test images"


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
    params=(
        "data.image_size", "data.channels", "validate", "registry.uri", "registry.model_name",
        "registry.max_batch_size",
    ),
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
    from tasks.registry import Registry

    data_contract.import_gx()
    imported = time.perf_counter()
    manifest = read_manifest(ws)
    v = p.validate
    prepared = {split: np.load(ws.images(split), mmap_mode="r", allow_pickle=False) for split in SPLITS}
    near = near_duplicates.find(manifest, prepared, v.near_duplicate_bits, v.near_duplicate_min_correlation)
    registry = Registry.open(ws, p.registry)
    production = registry.production()
    view, drift_message = None, "drift not checked: there is no production model yet"
    if production is not None:
        view, seen = _production_view(ws, p, registry, production, manifest)
        drift_message = f"drift checked against the production model's training data; {seen}"
    inputs = contract_inputs(ws, manifest, near, view)
    if ws.data_docs.exists():
        shutil.rmtree(ws.data_docs)  # Data Docs of earlier runs would list stale results
    checks = data_contract.run(v, p.data.image_size, p.data.channels, inputs, ws.data_docs)
    profile = data_profile(manifest)
    if production is not None:
        for d in drift_checks(profile, production.card.validation.data_profile, v.drift):
            checks.append(
                CheckResult(d.name, d.success, {"value": d.observed, "max": d.threshold},
                            unexpected_count=0 if d.success else 1, message=d.message,
                            action=getattr(v.drift.actions, d.name.removeprefix("drift_")))
            )
    log.info(drift_message)
    failures = [_failure(c) for c in checks if not c.success and c.action == "fail"]
    warnings = [_failure(c) for c in checks if not c.success and c.action == "warn"]
    report = ValidationReport(
        success=not failures,
        failures=failures,
        checks=[CheckSummary(c.name, c.success, c.observed, c.action) for c in checks],
        data_profile=profile,
        drift=DriftStatus(checked=production is not None, message=drift_message),
        counts=PrepareReport.read(ws.prepare_report, "prepare").counts,
        data_docs=str((ws.data_docs / "index.html").relative_to(ws.root)),
        details=checks,
        warnings=warnings,
        near_duplicates=near.summary,
        model_drift=None if view is None else view.drift,
    )
    report.write(ws.validation)
    if warnings:
        log.warning("data validation warnings (validate.drift.actions: warn), the run goes on:\n%s",
                    "\n".join(failure_lines(warnings)))
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
