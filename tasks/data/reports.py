"""What the data stages record: where data/ came from, what prepare decoded, and the data profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tasks.fs.records import Record


@dataclass(frozen=True)
class SourceSummary(Record):
    """data/source.json, written by ingest."""

    source: str
    checksum: dict[str, str]  # {"content_sha256": ...}
    counts: dict[str, dict[str, int]]  # split -> class -> images
    classes: list[str]
    details: dict[str, Any]  # archive checksum, split rule, ignored files


@dataclass(frozen=True)
class SplitCounts(Record):
    images: int
    decoded: int
    corrupt: int


@dataclass(frozen=True)
class CorruptFile(Record):
    split: str
    path: str
    error: str


@dataclass(frozen=True)
class PrepareReport(Record):
    """prepared/prepare_report.json."""

    image_size: int
    channels: int
    dtype: str
    classes: list[str]
    counts: dict[str, SplitCounts]
    shapes: dict[str, list[int]]  # split -> (N, C, H, W) of its images array
    corrupt_count: int
    corrupt: list[CorruptFile]  # the first MAX_REPORTED_CORRUPT of each split
    seconds: float
    images_per_s: float
    data_content_sha256: str = ""  # of the data/ it was prepared from (data/source.json); "" before it was recorded


@dataclass(frozen=True)
class DataProfile(Record):
    """The data a model is trained on, in numbers drift can be measured against."""

    label_distribution: dict[str, float]  # train split, class -> share
    pixel_mean: float  # train split, 0..1
    pixel_std: float
    n_train: int
    n_test: int
    content_hash: str  # of every decoded image's (split, pixel hash)


@dataclass(frozen=True)
class CheckResult(Record):
    """One check of the data contract: a Great Expectations expectation, or a drift check."""

    name: str
    success: bool
    observed: Any  # JSON-able summary of what was measured
    expectation: str = ""  # the Great Expectations expectation type; "" for checks outside GX
    column: str = ""
    unexpected_count: int = 0
    examples: list[str] = field(default_factory=list)
    message: str = ""
    action: Literal["fail", "warn"] = "fail"  # warn: a failure is reported and the run goes on


@dataclass(frozen=True)
class CheckSummary(Record):
    name: str
    success: bool
    observed: Any
    action: Literal["fail", "warn"] = "fail"


@dataclass(frozen=True)
class ValidationFailure(Record):
    expectation: str
    check: str
    column: str
    unexpected_count: int
    examples: list[str]
    message: str


@dataclass(frozen=True)
class DriftStatus(Record):
    checked: bool  # False while there is no production model to compare with
    message: str


@dataclass(frozen=True)
class NearDuplicatePair(Record):
    kind: str  # leak (a test image and its train twin) | within_train | within_test
    path: str
    twin: str
    bits: int  # Hamming distance of the perceptual hashes
    correlation: float  # of the 8x8 thumbnails


@dataclass(frozen=True)
class NearDuplicates(Record):
    """Near (not exact) duplicates; the counts are DVC metrics, the pairs (a list) are not."""

    leaks: int  # test images with a near duplicate in train
    within_split: int  # images with a near duplicate in their own split
    pairs: list[NearDuplicatePair]  # the first MAX_REPORTED_PAIRS, leaks first


@dataclass(frozen=True)
class ClassEstimate(Record):
    """Production's predictions of one class on the new data: the share ATC believes right, and the truth."""

    class_name: str
    predicted: int  # new images production assigns to this class
    estimated_accuracy: float  # share of them above the ATC threshold
    measured_accuracy: float  # share of them that are this class (prepared data is labelled)


@dataclass(frozen=True)
class ModelDrift(Record):
    """The new data as the production model sees it, against its own test split at promotion."""

    production_version: int
    scored: int  # new test images scored
    confidence_ks: float  # Kolmogorov-Smirnov distance of top-1 confidences, 0..1
    prediction_tv: float  # total-variation distance of predicted-class shares, 0..1
    estimated_accuracy: float  # ATC: share of new images above the threshold learnt at promotion
    measured_accuracy: float  # production's accuracy on the same images, from their labels
    per_class: list[ClassEstimate]  # by predicted class; a list, so DVC metrics leave it out


@dataclass(frozen=True)
class ValidationReport(Record):
    """reports/validation.json, written by validate whether it passed or not."""

    success: bool
    failures: list[ValidationFailure]
    checks: list[CheckSummary]
    data_profile: DataProfile
    drift: DriftStatus
    counts: dict[str, SplitCounts]
    data_docs: str  # index.html of the Great Expectations Data Docs, relative to the workspace
    details: list[CheckResult]
    warnings: list[ValidationFailure] = field(default_factory=list)  # failed checks whose action is warn
    near_duplicates: NearDuplicates | None = None  # None in reports written before near duplicates were checked
    model_drift: ModelDrift | None = None  # None while there is no production model with a confidence profile
