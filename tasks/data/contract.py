"""The image-data contract as Great Expectations Core suites, run on frames built from the manifest.

Four batches, one suite each, and two more when there is a production model to ask:
- ``images``: one row per image (manifest): corrupt files, exact and near duplicates within a split,
  degenerate images;
- ``test_images``: the test rows, with ``train_twin`` (a train image with the same pixels) and
  ``train_near_twin`` (a confirmed near duplicate in train): label set, leakage, near-duplicate leakage;
- ``classes``: one row per (split, class): minimum count, balance;
- ``tensors``: one row per split tensor file: shape, dtype, rows matching the manifest;
- ``scored``: one row per new test image production scored: its estimated accuracy (ATC);
- ``model_drift``: one row, production's view of the new data: confidence and predicted-class drift.
A check whose ``validate.drift.actions`` entry is warn runs at GX severity "warning".
Great Expectations is imported lazily: it costs seconds a process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.data.reports import CheckResult
from tasks.params import ValidateParams

log = logging.getLogger(__name__)
# GX logs every API registration at INFO; keep its warnings, drop the noise.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

MAX_EXAMPLES = 10  # paths quoted per failed expectation
ID_COLUMN = {
    "images": "path", "test_images": "path", "classes": "class", "tensors": "split", "scored": "path",
    "model_drift": "production",
}
TWIN_COLUMNS = {
    "train_twin": "same pixels as", "train_near_twin": "near duplicate of", "near_twin": "near duplicate of"
}


@dataclass(frozen=True)
class ContractInputs:
    images: pd.DataFrame
    test_images: pd.DataFrame
    classes: pd.DataFrame
    tensors: pd.DataFrame
    train_classes: list[str]
    scored: pd.DataFrame | None = None  # without a production model (or its confidence profile): None
    model_drift: pd.DataFrame | None = None


def _mostly(limit: int, n: int) -> float:
    """GX's ``mostly`` (share that must pass) allowing ``limit`` failing rows out of ``n``."""
    if limit <= 0 or n <= 0:
        return 1.0
    return max(0.0, 1.0 - (limit + 0.5) / n)  # +0.5: exactly ``limit`` failures must pass despite rounding


def _model_expectations(p: ValidateParams, inputs: ContractInputs) -> dict[str, list[Any]]:
    """The checks of the new data as the production model sees it (tasks/blessing/confidence.py)."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity
    from great_expectations.expectations.row_conditions import Column

    if inputs.scored is None or inputs.model_drift is None:
        return {}
    drift, row = p.drift, inputs.model_drift.iloc[0]

    def severity(action: str) -> FailureSeverity:
        return FailureSeverity.WARNING if action == "warn" else FailureSeverity.CRITICAL

    def shift(column: str, limit: float, check: str, action: str, what: str) -> Any:
        observed = {"value": float(row[column]), "max": limit, "p_value": float(row[column + "_p_value"]),
                    "significance": drift.significance}
        return gxe.ExpectColumnValuesToBeBetween(
            # GX Core 1.9+: a Condition object; string row conditions are deprecated
            column=column, max_value=limit, row_condition=Column(f"{column}_p_value") < drift.significance,
            severity=severity(action),
            meta={"check": check, "notes": f"{what} <= {limit} unless p >= {drift.significance}",
                  "observed": observed},
        )

    return {
        "scored": [
            gxe.ExpectColumnMeanToBeBetween(
                column="above_atc_threshold", min_value=drift.min_estimated_accuracy,
                severity=severity(drift.actions.estimated_accuracy),
                meta={"check": "drift_estimated_accuracy",
                      "notes": f"production's estimated accuracy (ATC) >= {drift.min_estimated_accuracy}",
                      "observed": {"min": drift.min_estimated_accuracy, "atc_threshold": float(row["atc_threshold"]),
                                   "measured_accuracy": float(inputs.scored["correct"].mean()),
                                   "production_accuracy": float(row["production_accuracy"])}},
            ),
        ],
        "model_drift": [
            shift("confidence_ks", drift.max_confidence_ks, "drift_confidence", drift.actions.confidence,
                  "KS distance of production's top-1 confidences vs its test split"),
            shift("prediction_tv", drift.max_prediction_tv, "drift_predicted_classes", drift.actions.predicted_classes,
                  "total variation of production's predicted classes vs its test split"),
        ],
    }


def expectations(p: ValidateParams, image_size: int, channels: int, inputs: ContractInputs) -> dict[str, list[Any]]:
    """Batch name -> its expectations, each tagged with ``meta.check`` (the check's stable name)."""
    import great_expectations.expectations as gxe

    n_images = len(inputs.images)
    meta = lambda name, text: {"check": name, "notes": text}  # noqa: E731 - one line per expectation below
    near = f"hashes within {p.near_duplicate_bits} bits, 8x8 thumbnails r >= {p.near_duplicate_min_correlation}"
    return {
        "images": [
            gxe.ExpectColumnValuesToBeInSet(
                column="decoded", value_set=[True], mostly=_mostly(p.max_corrupt, n_images),
                meta=meta("no_corrupt_files", f"at most {p.max_corrupt} undecodable files"),
            ),
            gxe.ExpectCompoundColumnsToBeUnique(
                column_list=["split", "content_hash"], ignore_row_if="any_value_is_missing",
                mostly=1.0 - p.max_duplicate_fraction,
                meta=meta(
                    "duplicates_within_split", f"at most {p.max_duplicate_fraction:.2%} exact duplicates in a split"
                ),
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="std", min_value=p.min_pixel_std, mostly=_mostly(p.max_degenerate, n_images),
                meta=meta("no_degenerate_images", f"pixel std >= {p.min_pixel_std} (not constant or blank)"),
            ),
            gxe.ExpectColumnValuesToBeNull(
                column="near_twin", mostly=1.0 - p.max_near_duplicate_fraction,
                meta=meta("near_duplicates_within_split",
                          f"at most {p.max_near_duplicate_fraction:.2%} near duplicates in a split ({near})"),
            ),
        ],
        "test_images": [
            gxe.ExpectColumnValuesToBeInSet(
                column="class_name", value_set=inputs.train_classes,
                meta=meta("label_set", "every test class is also a train class"),
            ),
            gxe.ExpectColumnValuesToBeNull(
                column="train_twin",
                meta=meta("no_train_test_leak", "no test image has the same pixels as a train image (leak)"),
            ),
            gxe.ExpectColumnValuesToBeNull(
                column="train_near_twin", mostly=1.0 - p.max_near_leak_fraction,
                meta=meta(
                    "no_near_duplicate_leak",
                    f"at most {p.max_near_leak_fraction:.2%} of test images near-duplicate a train image ({near})",
                ),
            ),
        ],
        "classes": [
            gxe.ExpectColumnValuesToBeBetween(
                column="count", min_value=p.min_per_class,
                meta=meta("min_per_class", f"at least {p.min_per_class} images per class in each split"),
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="largest_over_this", max_value=p.max_class_ratio,
                meta=meta("class_balance", f"largest / smallest class count within a split <= {p.max_class_ratio}"),
            ),
        ],
        "tensors": [
            gxe.ExpectColumnValuesToBeInSet(
                column="dtype", value_set=["uint8"], meta=meta("tensor_dtype", "images are uint8")
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column="label_dtype", value_set=["int64"], meta=meta("label_dtype", "labels are int64")
            ),
            *(
                gxe.ExpectColumnValuesToBeBetween(
                    column=column, min_value=value, max_value=value, meta=meta("tensor_shape", text)
                )
                for column, value, text in (
                    ("channels", channels, f"{channels} channels"),
                    ("height", image_size, f"height {image_size}"),
                    ("width", image_size, f"width {image_size}"),
                )
            ),
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="rows", column_B="decoded", meta=meta("tensor_rows", "one tensor row per decoded manifest row")
            ),
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="label_rows",
                column_B="decoded",
                meta=meta("tensor_rows", "one label per decoded manifest row"),
            ),
        ],
        **_model_expectations(p, inputs),
    }


def import_gx() -> None:
    """Import Great Expectations now (seconds), so callers can time it apart from validation."""
    import great_expectations  # noqa: F401


def _context(data_docs: Path) -> Any:
    """An ephemeral GX context (nothing persisted) whose Data Docs site is ``data_docs``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    from tasks.data import data_docs as offline_docs

    def offline(view: str) -> dict[str, str]:  # pages that render with no network
        return {"module_name": offline_docs.__name__, "class_name": view}

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            "visionops": {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs)},
                "site_index_builder": {
                    "class_name": "DefaultSiteIndexBuilder",
                    "view": offline(offline_docs.OfflineIndexPageView.__name__),
                },
                "site_section_builders": {
                    section: {"view": offline(offline_docs.OfflinePageView.__name__)}
                    for section in ("expectations", "validations", "profiling")
                },
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _examples(batch: str, result: dict[str, Any]) -> list[str]:
    id_column = ID_COLUMN[batch]
    examples: list[str] = []
    for row in result.get("partial_unexpected_index_list") or []:
        name = str(row.get(id_column, "?"))
        for column, relation in TWIN_COLUMNS.items():
            if row.get(column):
                name += f" ({relation} {row[column]})"
        if name not in examples:
            examples.append(name)
    return examples[:MAX_EXAMPLES]


def run(
    p: ValidateParams, image_size: int, channels: int, inputs: ContractInputs, data_docs: Path
) -> list[CheckResult]:
    """Run every suite, build the Data Docs at ``data_docs``, and return one result per expectation."""
    import great_expectations as gx

    context = _context(data_docs)
    source = context.data_sources.add_pandas("prepared")
    checks: list[CheckResult] = []
    for batch, suite_expectations in expectations(p, image_size, channels, inputs).items():
        frame: pd.DataFrame = getattr(inputs, batch)  # a batch without a frame has no expectations
        definition = source.add_dataframe_asset(batch).add_batch_definition_whole_dataframe(batch)
        suite = context.suites.add(gx.ExpectationSuite(name=f"visionops_{batch}"))
        for expectation in suite_expectations:
            suite.add_expectation(expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"visionops_{batch}", data=definition, suite=suite)
        )
        outcome = validation.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": [ID_COLUMN[batch]],
                "partial_unexpected_count": MAX_EXAMPLES,
            },
        )
        for item in outcome.results:
            config = item.expectation_config
            kwargs = config.kwargs
            result = item.result or {}
            exception = (item.exception_info or {}).get("exception_message")
            pair = f"{kwargs.get('column_A')}={kwargs.get('column_B')}"
            column = kwargs.get("column") or ",".join(kwargs.get("column_list") or []) or pair
            unexpected = int(result.get("unexpected_count") or 0)
            observed: dict[str, Any] = {
                "unexpected_count": unexpected, "element_count": int(result.get("element_count") or len(frame))
            }
            if "observed_value" in result:  # an aggregate expectation (a column mean)
                observed = {"value": float(result["observed_value"])}
            success = bool(item.success)
            checks.append(
                CheckResult(
                    name=config.meta["check"],
                    success=success,
                    observed={**observed, **config.meta.get("observed", {})},
                    expectation=config.type,
                    column=column,
                    unexpected_count=unexpected if unexpected or success else 1,
                    examples=_examples(batch, result),
                    message=exception or config.meta["notes"],
                    action="warn" if str(config.severity.value) == "warning" else "fail",
                )
            )
    context.build_data_docs(site_names=["visionops"])
    return checks
