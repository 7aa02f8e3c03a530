"""Validation benchmark: the near-duplicate search and production's view of new data on 60,000 manifest rows.

Prints, in one run on 60,000 synthetic 32x32 images (10 classes x 5,000 train / 1,000 test):
- the near-duplicate search time (target: under 10 s on 2 CPU cores), and its false-positive rate
  (distinct images flagged) on the synthetic set;
- its recall: test images put into train as a JPEG (quality 75), 10% smaller or larger, or 10%
  brighter copy, and the share of them found (as their own copy's near duplicate);
- validate's wall time without and with a production model (an untrained ResNet-18, cifar stem,
  exported to ONNX), and production's scoring throughput inside validate against the same
  onnxruntime session's own throughput on the same images and batch (what verify measures);
- with ``--digits``, the same false-positive rate and recall on a real-image set: the UCI handwritten
  digits (1,797 8x8 images; ``digits.csv.gz`` from scikit-learn's wheel, ``sklearn/datasets/data/``).

    python benchmarks/validation.py [--digits digits.csv.gz] [--scored 2000]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # candidate_factory: a complete card for a hand-made production model

from tasks import params as params_module  # noqa: E402
from tasks.data import near_duplicates  # noqa: E402
from tasks.data.imaging import encode_png, to_array  # noqa: E402
from tasks.data.phash import dct_hashes, to_hex  # noqa: E402
from tasks.data.sources import synthetic  # noqa: E402
from tasks.ingest import write_data  # noqa: E402
from tasks.params import Params, SyntheticParams  # noqa: E402
from tasks.paths import SPLITS, Workspace  # noqa: E402
from tasks.prepare import prepare  # noqa: E402

COPIES = 2000  # test images (evenly spread over the classes) whose copies are put into train


def _jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _resized(sign: int):
    """A copy 10% (at least 1 px) smaller or larger: 3 px of a 32 px image, 1 px of an 8 px digit."""

    def resize(png: bytes) -> bytes:
        img = Image.open(io.BytesIO(png))
        by = sign * max(1, round(0.1 * img.width))
        buf = io.BytesIO()
        img.resize((img.width + by, img.height + by), Image.Resampling.BILINEAR).save(buf, format="PNG")
        return buf.getvalue()

    return resize


def _brightened(png: bytes) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
    return encode_png(np.clip(pixels * 1.1, 0, 255).round().astype(np.uint8))


TRANSFORMS = {"jpeg q75": _jpeg, "10% smaller": _resized(-1), "10% larger": _resized(1), "10% brighter": _brightened}


Decoded = tuple[np.ndarray, list[str]]  # prepared pixels and their perceptual hashes


def _decoded(files: list[bytes], size: int) -> Decoded:
    pixels = np.stack([to_array(data, size, 3) for data in files])
    return pixels, to_hex(dct_hashes(pixels))


def _manifest(splits: dict[str, Decoded]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A manifest and prepared arrays as prepare writes them."""
    rows = [
        {"split": split, "index": i, "path": f"{split}/{i}", "decoded": True, "phash": hashes[i],
         "content_hash": pixels[i].tobytes().hex()}
        for split, (pixels, hashes) in splits.items()
        for i in range(len(pixels))
    ]
    return pd.DataFrame(rows), {split: pixels for split, (pixels, _hashes) in splits.items()}


def _rates(train_files: list[bytes], test_files: list[bytes], size: int, bits: int, min_correlation: float) -> str:
    """False-positive rate on distinct images, and the recall of each kind of copy of the test images."""
    train, test = _decoded(train_files, size), _decoded(test_files, size)
    manifest, images = _manifest({"train": train, "test": test})
    clean = near_duplicates.find(manifest, images, bits, min_correlation).summary
    n_train, n_test = len(train_files), len(test_files)
    within = clean.within_split / (n_train + n_test)
    line = (f"  r >= {min_correlation}: distinct test images flagged {clean.leaks}/{n_test}"
            f" = {clean.leaks / n_test:.2%}; within splits {clean.within_split}/{n_train + n_test} = {within:.2%};"
            " copies found:")
    for name, transform in TRANSFORMS.items():
        copies = _decoded([transform(data) for data in test_files], size)
        joined = (np.concatenate([train[0], copies[0]]), train[1] + copies[1])
        manifest, images = _manifest({"train": joined, "test": test})
        found = near_duplicates.find(manifest, images, bits, min_correlation)
        twins = found.train_twin.dropna().map(lambda text: int(text.split(" ")[0].split("/")[1]))
        test_row = manifest.loc[twins.index, "index"]
        hits = int((twins.to_numpy() == n_train + test_row.to_numpy()).sum())  # its own copy, not a look-alike
        line += f" {name} {hits}/{n_test} = {hits / n_test:.1%};"
    return line


def _digits(path: Path) -> tuple[list[bytes], list[bytes]]:
    """The UCI digits as 8x8 PNGs, first 80% train, the rest test."""
    with gzip.open(path) as fh:
        rows = np.loadtxt(fh, delimiter=",")
    pixels = np.clip(rows[:, :64] * 16, 0, 255).astype(np.uint8).reshape(-1, 8, 8)
    files = [encode_png(p) for p in pixels]
    cut = int(0.8 * len(files))
    return files[:cut], files[cut:]


def _production(ws: Workspace, p: Params, tmp: Path, scored: int) -> Callable[[], float]:
    """Publish an untrained ResNet-18 (cifar stem) as production; a timer of its warm onnxruntime session
    on the same ``scored`` test images at registry.max_batch_size (what verify measures)."""
    import torch

    from tasks.blessing import confidence
    from tasks.blessing.onnx_session import open_session
    from tasks.data.drift import data_profile
    from tasks.export import export_onnx
    from tasks.registry import MODEL_FILE, Registry
    from tasks.training.candidate import Deployable
    from tasks.training.models import build_model

    from candidate_factory import candidate_of, export_contract, make_card

    classes = json.loads(ws.classes.read_text())  # label i is classes[i], as the model's output i
    candidate = candidate_of(build_model("resnet18", "cifar", 10, 3), "resnet18", "cifar", classes, 3, 32)
    onnx = tmp / "model" / MODEL_FILE
    example = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    export_onnx(Deployable.of(candidate), example, onnx, opset=18)
    (tmp / "model" / "weights.pt").write_bytes(b"benchmark")
    files = {MODEL_FILE: onnx, "weights.pt": tmp / "model" / "weights.pt"}
    test = np.load(ws.images("test"), mmap_mode="r")
    labels = np.load(ws.labels("test"))
    rows = confidence.sample_rows(len(test), scored)
    images = np.ascontiguousarray(test[rows])
    session = open_session(onnx, "auto")
    session.probabilities(images[: p.registry.max_batch_size], p.registry.max_batch_size)  # warm-up

    def raw_seconds() -> float:
        start = time.perf_counter()
        session.probabilities(images, p.registry.max_batch_size)
        return time.perf_counter() - start

    probabilities = session.probabilities(images, p.registry.max_batch_size)
    profile = confidence.confidence_profile(probabilities, probabilities.argmax(axis=1) == labels[rows], classes)
    registry = Registry.open(ws, p.registry)
    with registry.lock():
        card = make_card(1, registry.model_name, files, export_contract(onnx, files["weights.pt"], classes, 3, 32),
                         profile.accuracy, profile=data_profile(pd.read_parquet(ws.manifest)))
        registry.publish(files, replace(card, confidence=profile))
    return raw_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=5000, help="train images per class (10 classes)")
    parser.add_argument("--test-per-class", type=int, default=1000, help="test images per class")
    parser.add_argument("--scored", type=int, default=2000, help="test images production scores (CPU: keep it small)")
    parser.add_argument("--digits", type=Path, help="digits.csv.gz from scikit-learn's wheel: a real-image set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    p = params_module.load(ROOT / "params.yaml")
    # An untrained model is a fine load but would fail the estimated-accuracy floor: measure, don't gate.
    drift = replace(p.validate.drift, max_scored_images=args.scored, min_estimated_accuracy=0.0)
    p = replace(p, validate=replace(p.validate, drift=drift))
    v = p.validate
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    dataset = synthetic.generate(SyntheticParams(10, args.per_class, args.test_per_class), seed=0)
    splits: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    for split, image in dataset.images():
        splits[split].append(image.image)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        ws.data.mkdir(parents=True)
        write_data(dataset, ws.data, p.data.ingest)
        n = sum(len(v) for v in splits.values())
        start = time.perf_counter()
        prepare(p.data, ws)
        print(f"prepare (with perceptual hashes): {time.perf_counter() - start:.1f} s for {n} images")

        from tasks import validate
        from tasks.data import contract

        contract.import_gx()
        manifest = validate.read_manifest(ws)
        prepared = {split: np.load(ws.images(split), mmap_mode="r") for split in SPLITS}
        start = time.perf_counter()
        found = near_duplicates.find(manifest, prepared, v.near_duplicate_bits, v.near_duplicate_min_correlation)
        search_s = time.perf_counter() - start
        n_test = int((manifest["split"] == "test").sum())
        print(f"near-duplicate search: {search_s:.2f} s for {len(manifest)} manifest rows (target < 10 s);"
              f" distinct test images flagged as leaks {found.summary.leaks}/{n_test}"
              f" = {found.summary.leaks / n_test:.2%}, within splits {found.summary.within_split}/{len(manifest)}"
              f" = {found.summary.within_split / len(manifest):.2%}")

        sections = params_module.sections(validate.ValidateSections, p)
        start = time.perf_counter()
        validate.validate(sections, ws)
        plain_s = time.perf_counter() - start
        raw_seconds = _production(ws, p, Path(tmp), args.scored)
        before = raw_seconds()  # the raw session just before and just after: the machine is shared
        start = time.perf_counter()
        report = validate.validate(sections, ws)
        with_model_s = time.perf_counter() - start
        raw_s = (before + raw_seconds()) / 2
        seen = report.model_drift
        assert seen is not None
        in_validate_s = with_model_s - plain_s
        print(f"validate: {plain_s:.1f} s without a production model; {with_model_s:.1f} s with one scoring"
              f" {seen.scored} test images: +{in_validate_s:.1f} s")
        print(f"production scoring: warm raw session {seen.scored / raw_s:,.0f} images/s at batch"
              f" {p.registry.max_batch_size} (mean of just before and after); validate's whole model-based part"
              f" (a cold session, the tests, two more GX suites) {seen.scored / in_validate_s:,.0f} images/s"
              f" = {raw_s / in_validate_s:.2f}x the runtime's throughput (1.00 = no overhead)")
        print(f"  model view of unchanged data: confidence KS {seen.confidence_ks}, estimated accuracy"
              f" {seen.estimated_accuracy} vs measured {seen.measured_accuracy}")

    test_per_class = args.test_per_class
    print(f"synthetic 32 px ({args.per_class}/{test_per_class} a class), near duplicates, defaults:")
    train, test = splits["train"], splits["test"][:: max(1, len(splits["test"]) // COPIES)][:COPIES]
    print(_rates(train, test, 32, v.near_duplicate_bits, v.near_duplicate_min_correlation))
    if args.digits:
        train, test = _digits(args.digits)
        print(f"UCI digits (real, 8x8, {len(train)} train / {len(test)} test, read at 32 px), near duplicates:")
        for r in (v.near_duplicate_min_correlation, 0.99, 0.995):
            print(_rates(train, test, 32, v.near_duplicate_bits, r))
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
