"""The data profile a model is trained on, and drift of new data against production's profile.

Pure functions: the profile (:class:`DataProfile`) is stored in validation.json and in the
production model's card, and compared here.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pandas as pd

from tasks.data.reports import DataProfile
from tasks.params import DriftParams


@dataclass(frozen=True)
class DriftCheck:
    name: str
    success: bool
    observed: float
    threshold: float
    message: str


def data_profile(manifest: pd.DataFrame) -> DataProfile:
    """label_distribution (train), pixel_mean/std (train, 0..1), counts and a content hash."""
    decoded = manifest[manifest["decoded"]]
    train = decoded[decoded["split"] == "train"]
    counts = train["class_name"].value_counts().sort_index()
    total = int(counts.sum())
    mean = float(train["mean"].mean()) if total else 0.0
    # Every image has the same pixel count, so the pooled variance is the mean of E[x^2] minus mean^2.
    second_moment = float((train["std"] ** 2 + train["mean"] ** 2).mean()) if total else 0.0
    digest = hashlib.sha256()
    for key in sorted((decoded["split"] + ":" + decoded["content_hash"]).tolist()):
        digest.update(key.encode())
    return DataProfile(
        label_distribution={str(k): round(int(v) / total, 6) for k, v in counts.items()} if total else {},
        pixel_mean=round(mean, 6),
        pixel_std=round(math.sqrt(max(second_moment - mean**2, 0.0)), 6),
        n_train=int((manifest["split"] == "train").sum()),
        n_test=int((manifest["split"] == "test").sum()),
        content_hash=digest.hexdigest(),
    )


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Half the L1 distance between two label distributions (0 = same, 1 = disjoint)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def drift_checks(current: DataProfile, production: DataProfile, p: DriftParams) -> list[DriftCheck]:
    """Label-distribution and pixel-statistics drift of ``current`` against ``production``."""
    tv = total_variation(current.label_distribution, production.label_distribution)
    mean_shift = abs(current.pixel_mean - production.pixel_mean)
    std_shift = abs(current.pixel_std - production.pixel_std)
    rows = (
        ("drift_label_distribution", tv, p.max_label_tv, "total-variation distance of the train label distribution"),
        ("drift_pixel_mean", mean_shift, p.max_mean_shift, "abs change of the mean pixel intensity (0..1)"),
        ("drift_pixel_std", std_shift, p.max_std_shift, "abs change of the pixel std (0..1)"),
    )
    return [
        DriftCheck(name, value <= limit, round(value, 6), limit, f"{what} vs production: {value:.4f} (max {limit})")
        for name, value, limit, what in rows
    ]
