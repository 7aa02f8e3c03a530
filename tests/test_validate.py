"""tasks/validate.py + tasks/data/contract.py: the Great Expectations contract on prepared data."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks import params as params_module
from tasks.data.contract import ContractInputs, _model_expectations, _mostly
from tasks.data.imaging import encode_png
from tasks.data.prepared import load_split
from tasks.data.raw import RawImage
from tasks.data.reports import DataProfile, ValidationReport
from tasks.data.sources import folder, synthetic
from tasks.errors import ValidationFailed
from tasks.ingest import write_data
from tasks.params import Params, SyntheticParams
from tasks.paths import Workspace
from tasks.prepare import prepare
from tasks.registry import Registry
from tasks.validate import ValidateSections, validate

import shapes_classifier as sc
from candidate_factory import export_contract, make_card, publish_pixel_reader
from conftest import PROJECT, run, write_class_folders, write_raw


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


@pytest.mark.integration  # GX: seconds to import
@pytest.mark.parametrize("p_value, fails", [(0.5, False), (1e-4, True)])
def test_a_drift_distance_over_its_bound_fails_only_when_significant(p_value: float, fails: bool) -> None:
    import great_expectations as gx

    drift = pd.DataFrame([{"production": "production version 1", "confidence_ks": 0.4,
                           "confidence_ks_p_value": p_value, "prediction_tv": 0.0, "prediction_tv_p_value": 1.0,
                           "atc_threshold": 0.5, "production_accuracy": 0.9}])
    p = _params().validate
    assert p.drift.max_confidence_ks < 0.4 and 0.5 >= p.drift.significance > 1e-4
    empty = pd.DataFrame()
    scored = pd.DataFrame({"above_atc_threshold": [1.0], "correct": [1.0]})
    inputs = ContractInputs(empty, empty, empty, empty, [], scored=scored, model_drift=drift)
    context = gx.get_context(mode="ephemeral")
    batch = context.data_sources.add_pandas("t").add_dataframe_asset("d").add_batch_definition_whole_dataframe("d")
    confidence, predictions = _model_expectations(p, inputs)["model_drift"]
    outcome = [batch.get_batch(batch_parameters={"dataframe": drift}).validate(e) for e in (confidence, predictions)]
    assert [r.success for r in outcome] == [not fails, True]


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


def _shape_files(root: Path, per_class: tuple[int, int], seed: int) -> dict[str, list[Path]]:
    """Synthetic shapes as class folders ``root/{train,test}/<class>/<i>.png``."""
    dataset = synthetic.generate(SyntheticParams(10, *per_class), seed=seed)
    files: dict[str, list[Path]] = {}
    for split, img in dataset.images():
        path = root / img.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(img.image)
        files.setdefault(split, []).append(path)
    return files


@pytest.mark.integration
def test_near_duplicate_leaks_are_named_and_within_split_copies_counted_apart(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _shape_files(src, (20, 10), seed=0)
    disk, ring = files["test"][0], files["test"][45]  # test/disk/00000.png, test/ring/00005.png
    with Image.open(disk) as img:
        img.save(src / "train" / "disk" / "copy.jpg", format="JPEG", quality=75)  # re-encoded
    with Image.open(ring) as img:
        img.resize((35, 35), Image.Resampling.BILINEAR).save(src / "train" / "ring" / "bigger.png")
    train_plus = files["train"][65]  # train/plus/00005.png: a brighter copy beside it, and an exact one
    brighter = np.clip(np.asarray(Image.open(train_plus), dtype=np.float32) * 1.1, 0, 255).round().astype(np.uint8)
    (src / "train" / "plus" / "brighter.png").write_bytes(encode_png(brighter))
    shutil.copy(train_plus, src / "train" / "plus" / "exact.png")
    ws, p = Workspace(tmp_path / "ws"), _params()
    _ingest_folder(src, ws, p)
    with pytest.raises(ValidationFailed, match="no_near_duplicate_leak") as info:
        validate(_sections(replace(p, data=replace(p.data, image_size=32))), ws)
    message = str(info.value)
    assert "test/disk/00000.png (near duplicate of train/disk/copy.jpg (" in message
    assert "test/ring/00005.png (near duplicate of train/ring/bigger.png (" in message
    report = ValidationReport.read(ws.validation, "validate")
    assert report.near_duplicates is not None and report.near_duplicates.leaks == 2
    failed = {f.check: f for f in report.failures}
    assert failed["no_near_duplicate_leak"].unexpected_count == 2
    assert "no_train_test_leak" not in failed and "near_duplicates_within_split" not in failed
    # Within train, the brighter copy is a near duplicate of the original and of its exact copy; the
    # original and its exact copy are not near duplicates of each other: the exact check counts them.
    twin = {pair.path: pair.twin for pair in report.near_duplicates.pairs if pair.kind == "within_train"}
    plus = "train/plus/00005.png"
    assert twin == {"train/plus/brighter.png": twin["train/plus/brighter.png"],
                    plus: "train/plus/brighter.png", "train/plus/exact.png": "train/plus/brighter.png"}
    assert twin["train/plus/brighter.png"] in (plus, "train/plus/exact.png")
    assert report.near_duplicates.within_split == 3
    exact = next(c for c in report.details if c.name == "duplicates_within_split")
    assert exact.unexpected_count == 2


def _shapes_split(images: np.ndarray, labels: np.ndarray, split: str) -> list[RawImage]:
    return [RawImage(f"{split}/{sc.CLASSES[y]}/{i:04d}.png", sc.CLASSES[y], encode_png(img.transpose(1, 2, 0)))
            for i, (img, y) in enumerate(zip(images, labels, strict=True))]


def _shapes_workspace(root: Path, p: Params, seed: int, transform=None) -> Workspace:
    """prepared/ from the four shape classes at 16 px (train 40 a class, test 100), pixels ``transform``-ed."""
    ws = Workspace(root)
    splits = {}
    for split, per_class in (("train", 40), ("test", 100)):
        images, labels = sc.shapes(per_class, seed=seed, split=split)
        splits[split] = _shapes_split(transform(images) if transform else images, labels, split)
    write_raw(ws.data, splits)
    prepare(p.data, ws)
    return ws


def _shapes_params(registry: Path) -> Params:
    p = _params(max_near_leak_fraction=1.0, max_near_duplicate_fraction=1.0)  # not under test here
    return replace(p, data=replace(p.data, image_size=sc.SIZE), registry=replace(p.registry, uri=str(registry)))


@pytest.fixture(scope="module")
def shapes_production(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry whose production is a CNN really trained on the shapes, its card with a confidence profile."""
    import torch

    from tasks.blessing import confidence
    from tasks.data.drift import data_profile
    from tasks.export import export_onnx
    from tasks.registry import MODEL_FILE

    root = tmp_path_factory.mktemp("shapes")
    p = _shapes_params(root / "registry")
    own = _shapes_workspace(root / "production", p, seed=0)  # the data production was trained and tested on
    onnx = root / "model" / MODEL_FILE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a busy 2-core machine (see conftest's single_thread_torch)
    try:
        export_onnx(sc.shapes_model(), sc.example_input(), onnx, opset=18)
    finally:
        torch.set_num_threads(threads)
    test = load_split(own, "test")
    probabilities = confidence.score(onnx, test.images[:], 64)  # 400 tiny images: read whole
    correct = np.array(sc.CLASSES)[probabilities.argmax(axis=1)] == np.array(test.classes)[test.labels]  # by name
    profile = confidence.confidence_profile(probabilities, correct, sc.CLASSES)
    (root / "model" / "weights.pt").write_bytes(b"weights")
    files = {MODEL_FILE: onnx, "weights.pt": root / "model" / "weights.pt"}
    registry = Registry.open(own, p.registry)
    with registry.lock():
        card = make_card(1, registry.model_name, files, export_contract(onnx, files["weights.pt"], sc.CLASSES, 3, 16),
                         profile.accuracy, profile=data_profile(pd.read_parquet(own.manifest)))
        registry.publish(files, replace(card, confidence=profile))
    return root / "registry"


@pytest.mark.integration
def test_content_drift_with_equal_pixel_statistics_is_seen_by_the_model(tmp_path: Path, shapes_production) -> None:
    """Production (a CNN trained on shapes) scores new data whose pixels were scrambled: every image keeps
    its mean and std and the label mix stays, so the pixel checks pass; the model's confidences do not."""
    p = _shapes_params(shapes_production)
    unchanged = validate(_sections(p), _shapes_workspace(tmp_path / "unchanged", p, seed=3))
    seen = unchanged.model_drift
    assert unchanged.success and seen is not None and seen.production_version == 1 and seen.scored == 400
    assert abs(seen.estimated_accuracy - seen.measured_accuracy) <= 0.05 and seen.confidence_ks < 0.1

    scrambled = _shapes_workspace(tmp_path / "scrambled", p, seed=3, transform=sc.scrambled)
    with pytest.raises(ValidationFailed, match="drift_confidence"):
        validate(_sections(p), scrambled)
    report = ValidationReport.read(scrambled.validation, "validate")
    results = {c.name: c for c in report.details}
    for pixel_check in ("drift_label_distribution", "drift_pixel_mean", "drift_pixel_std"):
        assert results[pixel_check].success, results[pixel_check]
    assert report.data_profile.pixel_mean == unchanged.data_profile.pixel_mean
    assert report.model_drift is not None and report.model_drift.measured_accuracy < 0.5
    observed = results["drift_confidence"].observed
    assert observed["value"] > 0.1 and observed["p_value"] < 0.01

    # The same data with the model-based checks set to warn: reported, and the run goes on.
    warn = replace(p.validate.drift.actions, confidence="warn", predicted_classes="warn", estimated_accuracy="warn")
    lenient = replace(p, validate=replace(p.validate, drift=replace(p.validate.drift, actions=warn)))
    report = validate(_sections(lenient), scrambled)
    assert report.success and "drift_confidence" in {w.check for w in report.warnings}
    assert {c.name: c.action for c in report.checks}["drift_confidence"] == "warn"


@pytest.mark.integration
def test_dvc_repro_runs_the_model_based_checks(workspace: Workspace, shapes_production: Path) -> None:
    splits = {}
    for split, per_class in (("train", 40), ("test", 100)):
        images, labels = sc.shapes(per_class, seed=3, split=split)
        splits[split] = _shapes_split(sc.scrambled(images), labels, split)
    write_raw(workspace.data, splits)
    params_module.write_overrides(workspace.params_file, {
        "data.source": "test",  # the source write_raw's data/ says it holds: prepare refuses another
        "data.image_size": sc.SIZE, "registry.uri": str(shapes_production), "validate.min_per_class": 2,
        "validate.max_near_leak_fraction": 1.0, "validate.max_near_duplicate_fraction": 1.0,
    })
    proc = run(["dvc", "repro", "validate"], workspace.root, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "drift_confidence" in proc.stderr and "ValidationFailed" in proc.stderr, proc.stderr
    report = ValidationReport.read(workspace.validation, "validate")
    assert report.model_drift is not None and report.model_drift.production_version == 1
    failed = {f.check for f in report.failures}  # the model-based checks only: the pixels look the same
    assert "drift_confidence" in failed and failed <= {"drift_confidence", "drift_predicted_classes"}
