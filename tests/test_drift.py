"""tasks/data/drift.py: the data profile and drift against production's profile."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tasks import params
from tasks.data.drift import data_profile, drift_checks, total_variation
from tasks.data.reports import DataProfile

from conftest import PROJECT


def _manifest(pixels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    flat = pixels.reshape(len(pixels), -1) / 255.0
    return pd.DataFrame({
        "split": ["train"] * len(pixels) + ["test"],
        "class_name": [*classes, "a"],
        "content_hash": [f"h{i}" for i in range(len(pixels))] + [None],
        "mean": [*flat.mean(axis=1), None],
        "std": [*flat.std(axis=1), None],
        "decoded": [True] * len(pixels) + [False],
    })


def test_profile_pools_per_image_statistics_exactly() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 4))
    profile = data_profile(_manifest(pixels, ["a", "a", "b", "b", "b"]))
    assert profile.pixel_mean == pytest.approx(pixels.mean() / 255, abs=1e-6)
    assert profile.pixel_std == pytest.approx(pixels.std() / 255, abs=1e-6)
    assert profile.label_distribution == {"a": 0.4, "b": 0.6}
    assert (profile.n_train, profile.n_test) == (5, 1)


def test_content_hash_ignores_row_order() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (3, 1, 2, 2))
    manifest = _manifest(pixels, ["a", "b", "b"])
    assert data_profile(manifest).content_hash == data_profile(manifest.iloc[::-1]).content_hash


def test_total_variation() -> None:
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1
    assert total_variation({"a": 0.6, "b": 0.4}, {"a": 0.4, "b": 0.4, "c": 0.2}) == pytest.approx(0.2)


def test_drift_checks_compare_with_thresholds() -> None:
    current = DataProfile({"a": 0.5, "b": 0.5}, pixel_mean=0.50, pixel_std=0.20, n_train=2, n_test=2, content_hash="c")
    production = DataProfile(
        {"a": 0.7, "b": 0.3}, pixel_mean=0.45, pixel_std=0.40, n_train=2, n_test=2, content_hash="p"
    )
    drift = replace(params.load(PROJECT / "params.yaml").validate.drift, max_label_tv=0.15, max_mean_shift=0.1,
                    max_std_shift=0.1)
    checks = {c.name: c for c in drift_checks(current, production, drift)}
    assert not checks["drift_label_distribution"].success and checks["drift_label_distribution"].observed == 0.2
    assert checks["drift_pixel_mean"].success
    assert not checks["drift_pixel_std"].success and "0.2000 (max 0.1)" in checks["drift_pixel_std"].message
