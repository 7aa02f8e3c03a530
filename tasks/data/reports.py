"""What the data stages record: where data/ came from, what prepare decoded, and the data profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class CheckSummary(Record):
    name: str
    success: bool
    observed: Any


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
