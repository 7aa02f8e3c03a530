"""tasks/validate.py + tasks/data/contract.py: the Great Expectations contract on prepared data."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tasks import params as params_module
from tasks.data.contract import _mostly
from tasks.data.imaging import encode_png
from tasks.data.reports import DataProfile, ValidationReport
from tasks.data.sources import folder
from tasks.errors import ValidationFailed
from tasks.ingest import write_data
from tasks.params import Params
from tasks.paths import Workspace
from tasks.prepare import prepare
from tasks.registry import Registry
from tasks.validate import ValidateSections, validate

from candidate_factory import publish_pixel_reader
from conftest import PROJECT, run, write_class_folders


def _params(**validate_overrides) -> Params:
    p = params_module.load(PROJECT / "params.yaml")
    data = replace(p.data, image_size=16, channels=3, test_fraction=0.25)
    return replace(p, data=data, validate=replace(p.validate, min_per_class=2, **validate_overrides))


def _sections(p: Params) -> ValidateSections:
    return params_module.sections(ValidateSections, p)


def _ingest_folder(src: Path, ws: Workspace, p: Params) -> None:
    """data/ from a class-folder source without DVC (validate does not need versioning)."""
    dataset = folder.load(str(src), p.data.test_fraction, p.data.seed, p.data.ingest, ws.root / "cache")
    ws.data.mkdir(parents=True)
    write_data(dataset, ws.data, p.data.ingest)
    prepare(p.data, ws)


@pytest.mark.integration
def test_clean_class_folders_pass_and_write_the_reports(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "src" / "train", {"cat": 4, "dog": 4}, size=(20, 14))
    write_class_folders(tmp_path / "src" / "test", {"cat": 2, "dog": 2}, size=(9, 9), mode="L", seed=1)
    ws, p = Workspace(tmp_path / "ws"), _params()
    _ingest_folder(tmp_path / "src", ws, p)
    summary = validate(_sections(p), ws)
    assert summary.success and summary.failures == []
    names = {c.name for c in summary.checks}
    assert {"label_set", "min_per_class", "class_balance", "tensor_shape", "tensor_dtype", "no_corrupt_files",
            "duplicates_within_split", "no_train_test_leak", "no_degenerate_images"} <= names
    profile = summary.data_profile
    assert profile.label_distribution == {"cat": 0.5, "dog": 0.5}
    assert (profile.n_train, profile.n_test) == (8, 4) and 0.3 < profile.pixel_mean < 0.7
    assert not summary.drift.checked and "no production model" in summary.drift.message
    assert ValidationReport.read(ws.validation, "validate") == summary
    assert (ws.data_docs / "index.html").is_file()


@pytest.mark.integration
def test_every_broken_rule_is_reported_with_counts_and_paths(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_class_folders(src / "train", {"cat": 6, "dog": 2}, size=(12, 12))
    write_class_folders(src / "test", {"cat": 2, "dog": 2, "eel": 2}, size=(12, 12), seed=1)
    good = (src / "train" / "cat" / "000.png").read_bytes()
    (src / "train" / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "train" / "dog" / "notes.png").write_text("a text file named .png\n")
    shutil.copy(src / "test" / "dog" / "001.png", src / "train" / "dog" / "leaked.png")
    shutil.copy(src / "train" / "cat" / "001.png", src / "train" / "cat" / "copy.png")
    blank = np.full((12, 12, 3), 128, np.uint8)
    (src / "train" / "cat" / "blank.png").write_bytes(encode_png(blank))
    ws, p = Workspace(tmp_path / "ws"), _params(max_duplicate_fraction=0.0, max_class_ratio=2.0)
    _ingest_folder(src, ws, p)
    with pytest.raises(ValidationFailed) as info:
        validate(_sections(replace(p, data=replace(p.data, image_size=8))), ws)  # tensors were prepared at 16
    message = str(info.value)
    for needle in ("truncated.png", "notes.png", "leak", "test/dog/001.png (same pixels as train/dog/leaked.png)",
                   "duplicates_within_split", "blank.png", "label_set", "test/eel", "class_balance", "tensor_shape"):
        assert needle in message, f"{needle!r} missing from:\n{message}"
    summary = ValidationReport.read(ws.validation, "validate")
    assert not summary.success
    failures = {f.check: f for f in summary.failures if f.column != "width"}
    assert failures["no_corrupt_files"].unexpected_count == 2
    assert sorted(failures["no_corrupt_files"].examples) == ["train/cat/truncated.png", "train/dog/notes.png"]
    assert failures["no_train_test_leak"].unexpected_count == 1
    assert failures["duplicates_within_split"].unexpected_count == 2
    assert failures["no_degenerate_images"].examples == ["train/cat/blank.png"]
    assert failures["label_set"].unexpected_count == 2
    assert "train/eel" in failures["min_per_class"].examples
    assert "tensor_dtype" not in failures and "no_corrupt_files" in failures


@pytest.mark.integration
def test_drift_against_the_production_card(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "src", {"cat": 4, "dog": 4}, size=(8, 8))
    ws, p = Workspace(tmp_path / "ws"), _params()
    _ingest_folder(tmp_path / "src", ws, p)
    production = DataProfile(
        {"cat": 0.9, "dog": 0.1}, pixel_mean=0.1, pixel_std=0.29, n_train=6, n_test=2, content_hash="x"
    )
    publish_pixel_reader(Registry.open(ws, p.registry), tmp_path / "production", 0, profile=production)
    with pytest.raises(ValidationFailed, match="drift_label_distribution") as info:
        validate(_sections(p), ws)
    assert "drift_pixel_mean" in str(info.value) and "drift_pixel_std" not in str(info.value)
    assert ValidationReport.read(ws.validation, "validate").drift.checked


def test_mostly_allows_exactly_the_limit() -> None:
    n, limit = 60_000, 3
    mostly = _mostly(limit, n)
    assert (n - limit) / n >= mostly > (n - limit - 1) / n
    assert _mostly(0, n) == 1.0


@pytest.mark.integration
def test_stage_entry_exits_non_zero_naming_the_leak(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "src" / "train", {"a": 3, "b": 3}, size=(8, 8))
    write_class_folders(tmp_path / "src" / "test", {"a": 2, "b": 2}, size=(8, 8), seed=5)
    shutil.copy(tmp_path / "src" / "test" / "a" / "000.png", tmp_path / "src" / "train" / "a" / "dup.png")
    ws = Workspace(tmp_path / "ws")
    _ingest_folder(tmp_path / "src", ws, _params())
    shutil.copy(PROJECT / "params.yaml", ws.params_file)
    params_module.write_overrides(ws.params_file, {"validate.min_per_class": 1, "data.image_size": 16})
    proc = run(["python", "-m", "tasks.validate"], ws.root, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "ValidationFailed" in proc.stderr and "leak" in proc.stderr and "train/a/dup.png" in proc.stderr
