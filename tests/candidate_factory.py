"""Tiny candidates, test splits, ONNX models and evidence files for the blessing tests.

Two kinds of model:
- `tiny_candidate`: a real torchvision ResNet-18 candidate.pt (8x8 images) for evaluate/export/verify;
- `pixel_reader_onnx`: a hand-built ONNX classifier whose answer is written into the images
  (channel ``read_channel``, row 0, columns 0..K-1), so a test decides exactly which images each
  model gets right. Promotion and registry tests use it: no torch, no export, milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from tasks import params as params_mod
from tasks.blessing.gate import FloorCheck
from tasks.blessing.reports import (
    AccuracyMatch,
    Check,
    ClassScores,
    ExportReport,
    Latency,
    MetricsReport,
    Normalization,
    OutputContract,
    Parity,
    Throughput,
    TrainReport,
    VerificationReport,
    Versions,
)
from tasks.data.reports import DataProfile, DriftStatus, ValidationReport
from tasks.export import input_contract
from tasks.fs.hashing import file_digest
from tasks.params import Params
from tasks.paths import Workspace

if TYPE_CHECKING:
    from tasks.blessing.evidence import Card
    from tasks.registry import Registry
    from tasks.training.candidate import Candidate

PROJECT = Path(__file__).resolve().parents[1]

CLASSES3 = ["cat", "dog", "eel"]


def write_params(ws: Workspace, overrides: dict[str, Any]) -> Params:
    """The project's params.yaml with ``overrides`` (DVC -S meaning), written into ``ws``."""
    raw = params_mod.apply_overrides(params_mod.read_raw(PROJECT / "params.yaml"), overrides)
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.params_file.write_text(yaml.safe_dump(raw))
    return params_mod.parse(raw)


def stage_command(module: str) -> dict[str, Any]:
    """``python -m <module>`` in a workspace, importing this checkout's tasks/ (a real process)."""
    return {"args": [sys.executable, "-m", module], "env": {**os.environ, "PYTHONPATH": str(PROJECT)}, "text": True}


def run_stage(ws: Workspace, module: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # Exit codes are what the tests assert on, so no check=True.
    return subprocess.run(**stage_command(module), cwd=ws.root, capture_output=True, timeout=timeout, check=False)


def write_split(ws: Workspace, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    ws.prepared.mkdir(parents=True, exist_ok=True)
    np.save(ws.images("test"), images.astype(np.uint8))
    np.save(ws.labels("test"), labels.astype(np.int64))
    ws.classes.write_text(json.dumps(classes))


def candidate_of(
    model: Any, arch: str, stem: str, classes: list[str], channels: int, size: int, eval_crop: float = 1.0
) -> Candidate:
    """An untrained ``model`` as a candidate, with a made-up normalisation (one value per channel)."""
    from tasks.training.candidate import Candidate

    return Candidate(
        state_dict=model.state_dict(),
        arch=arch,
        stem=stem,
        num_classes=len(classes),
        in_channels=channels,
        image_size=size,
        classes=classes,
        normalization={"mean": [0.5, 0.4, 0.3][:channels], "std": [0.25, 0.2, 0.3][:channels]},
        params={},
        device="cpu",
        device_name="cpu (tests)",
        weights_source="random initialisation",
        data_digest="none",
        metrics={"test_accuracy": 0.0},
        eval_crop=eval_crop,
    )


def tiny_candidate(
    ws: Workspace, seed: int = 0, k: int = 3, size: int = 8, n_test: int = 24, eval_crop: float = 1.0
) -> None:
    """A real (untrained) ResNet-18 candidate.pt in the documented format, plus a random test split."""
    import torch

    from tasks.training.candidate import save_candidate
    from tasks.training.models import build_model

    torch.manual_seed(seed)
    classes = CLASSES3[:k] if k <= 3 else [f"class{i}" for i in range(k)]
    model = build_model("resnet18", "cifar", k, 3)
    save_candidate(ws.candidate, candidate_of(model, "resnet18", "cifar", classes, 3, size, eval_crop))
    rng = np.random.default_rng(seed)
    write_split(ws, rng.integers(0, 256, (n_test, 3, size, size), dtype=np.uint8), rng.integers(0, k, n_test), classes)


def pixel_reader_onnx(path: Path, k: int, channels: int, size: int, read_channel: int, salt: str = "") -> None:
    """ONNX: uint8 (N, C, S, S) -> softmax of pixels [read_channel, 0, 0:k] (scaled) as (N, k).

    ``salt`` changes the file's bytes (its doc string), not its answers."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["f", "starts", "ends", "axes"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Softmax", ["m"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "pixel_reader",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k])],
        initializer=[
            const("starts", [read_channel, 0, 0]),
            const("ends", [read_channel + 1, 1, k]),
            const("axes", [1, 2, 3]),
            const("shape", [-1, k]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    model.doc_string = salt
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def answers_images(answers: list[np.ndarray], k: int, size: int = 4) -> np.ndarray:
    """Images whose channel c tells a pixel reader of channel c to answer ``answers[c]``."""
    n = len(answers[0])
    images = np.zeros((n, len(answers), size, size), dtype=np.uint8)
    for c, ans in enumerate(answers):
        images[np.arange(n), c, 0, np.asarray(ans)] = 255
    return images


def answers_for(labels: np.ndarray, correct: np.ndarray, k: int) -> np.ndarray:
    """Predictions that are right exactly where ``correct`` is True."""
    return np.where(correct, labels, (labels + 1) % k)


def export_contract(onnx_path: Path, weights: Path, classes: list[str], channels: int, size: int) -> ExportReport:
    return ExportReport(
        model=onnx_path.name,
        sha256=file_digest(onnx_path),
        candidate_sha256=file_digest(weights),
        opset=18,
        exporter="hand-built",
        torch="none",
        input=input_contract(channels, size),
        output=OutputContract(name="probabilities", dtype="float32", shape=["batch", len(classes)], meaning="softmax"),
        classes=classes,
        normalization=Normalization(mean=[0.0] * channels, std=[1.0] * channels, baked_in=True),
        arch="pixel_reader",
        stem="none",
        fp16=None,
    )


def floor_check(accuracy: float, passed: bool = True, min_accuracy: float = 0.5) -> FloorCheck:
    failures = () if passed else (f"accuracy {accuracy:.4f} < gate.min_accuracy {min_accuracy:.4f}",)
    return FloorCheck(passed, accuracy, min_accuracy, 0.0, failures)


def metrics_report(accuracy: float, candidate_sha256: str, classes: list[str], passed: bool = True) -> MetricsReport:
    """A metrics.json whose per-class numbers all equal ``accuracy`` (as if every class scored alike)."""
    scores = ClassScores(precision=accuracy, recall=accuracy, f1=accuracy, support=1)
    return MetricsReport(
        accuracy=accuracy,
        macro_f1=accuracy,
        n_test=len(classes),
        per_class={name: scores for name in classes},
        gate=floor_check(accuracy, passed),
        classes=classes,
        confusion_matrix=[[0] * len(classes) for _ in classes],
        device="cpu",
        candidate_sha256=candidate_sha256,
    )


def verification_report(export: ExportReport, provider: str = "cpu", passed: bool = True) -> VerificationReport:
    parity = Parity(batch=1, max_abs_diff=0.0, top1_agreement=1.0, finite=True, images_repeated=False, passed=passed)
    return VerificationReport(
        passed=passed,
        failures=[] if passed else ["parity_batch_1"],
        provider_requested=provider,
        provider_active=provider,
        cuda_verified=provider == "cuda",
        fallback_reason=None,
        onnx_sha256=export.sha256,
        candidate_sha256=export.candidate_sha256,
        atol=1e-3,
        min_agreement=0.99,
        parity=[parity],
        accuracy=AccuracyMatch(
            onnx=1.0, torch=1.0, difference=0.0, tolerance=0.01, top1_agreement=1.0, max_abs_diff=0.0, n_test=1
        ),
        latency_ms=Latency(p50=1.0, p95=1.0, runs=1),
        throughput=Throughput(batch=1, runs=1, images_per_s=1.0, io_binding=False),
        fp16=None,
        checks=[Check("parity_batch_1", passed, "hand-built")],
        versions=Versions("3", "none", "none", 18, "cpu", None, None, None, None),
    )


def train_report(device: str = "cpu", device_name: str = "cpu (2 threads)") -> TrainReport:
    return TrainReport(
        test_accuracy=0.9, train_loss=0.3, epochs=1, train_seconds=1.0, images_per_s=100.0, resumed_from_epoch=0,
        device=device, device_name=device_name, batch_size=16, steps_per_epoch=1, peak_lr=0.1, weights="none",
    )


def validation_report(success: bool = True, profile: DataProfile | None = None) -> ValidationReport:
    profile = profile or DataProfile({"a": 1.0}, pixel_mean=0.1, pixel_std=0.2, n_train=1, n_test=1, content_hash="c")
    return ValidationReport(
        success=success,
        failures=[],
        checks=[],
        data_profile=profile,
        drift=DriftStatus(False, "drift not checked: there is no production model yet"),
        counts={},
        data_docs="reports/data_docs/index.html",
        details=[],
    )


def pixel_reader_candidate(
    ws: Workspace,
    read_channel: int,
    accuracy: float = 0.9,
    provider: str = "cpu",
    gate_passed: bool = True,
    weights_bytes: int = 1024,
    salt: str = "",
) -> None:
    """A complete, consistent candidate: candidate.pt (opaque bytes), model.onnx and every report.

    The test split (write it first with `write_split`) decides what the ONNX model answers;
    ``salt`` makes both files' bytes differ from another candidate's with the same answers.
    """
    split_channels = int(np.load(ws.images("test"), mmap_mode="r").shape[1])
    size = int(np.load(ws.images("test"), mmap_mode="r").shape[2])
    classes = json.loads(ws.classes.read_text())
    ws.models.mkdir(parents=True, exist_ok=True)
    ws.candidate.write_bytes(np.random.default_rng(read_channel).bytes(weights_bytes) + salt.encode())
    pixel_reader_onnx(ws.onnx_model, len(classes), split_channels, size, read_channel, salt)
    contract = export_contract(ws.onnx_model, ws.candidate, classes, split_channels, size)
    contract.write(ws.export_report)
    metrics_report(accuracy, contract.candidate_sha256, classes, gate_passed).write(ws.metrics)
    verification_report(contract, provider).write(ws.verification)
    validation_report().write(ws.validation)


N_TEST = 60  # images of the promotion tests' split


def make_ws(root: Path, registry: Path | str, **overrides: Any) -> Workspace:
    """A promotion workspace (params.yaml only) on the registry at ``registry`` (a folder or a URL)."""
    ws = Workspace(root)
    write_params(
        ws,
        {
            "registry.uri": str(registry),
            "registry.model_name": "clf",
            "promote.require_provider": "cpu",
            "registry.max_batch_size": 16,
            **overrides,
        },
    )
    return ws


def nested_split(ws: Workspace, right: tuple[int, int, int]) -> None:
    """Channel c's reader gets the first right[c] of N_TEST images right (nested sets: a superset is better)."""
    labels = np.random.default_rng(0).integers(0, 3, N_TEST)
    answers = [answers_for(labels, np.arange(N_TEST) < r, 3) for r in right]
    write_split(ws, answers_images(answers, 3), labels, CLASSES3)


def make_card(
    version: int,
    model_name: str,
    files: dict[str, Path],
    export: ExportReport,
    accuracy: float,
    profile: DataProfile | None = None,
) -> Card:
    """A complete card for ``files`` (the registry checks the version and the hashes against them)."""
    from tasks.blessing.decision import PromotionDecision, VerifiedOn
    from tasks.blessing.evidence import Card, CardData

    metrics = metrics_report(accuracy, export.candidate_sha256, export.classes)
    return Card(
        version=version,
        model_name=model_name,
        promoted_at="2026-01-01T00:00:00+00:00",
        classes=export.classes,
        files={name: file_digest(path) for name, path in files.items()},
        data=CardData(md5=None, source=None),
        validation=validation_report(profile=profile),
        params={},
        git_rev=None,
        training=None,
        metrics=metrics,
        export=export,
        verification=verification_report(export),
        gate=PromotionDecision(
            promoted=True,
            summary=f"test version {version}",
            floor=metrics.gate,
            verification=VerifiedOn("cpu", False, "cpu", True),
            version=version,
        ),
    )


def publish_pixel_reader(
    registry: Registry,
    src: Path,
    read_channel: int,
    classes: list[str] = CLASSES3,
    channels: int = 3,
    size: int = 4,
    accuracy: float = 0.5,
    profile: DataProfile | None = None,
    weights_bytes: int = 0,
) -> int:
    """Publish a pixel-reader model (files written under ``src``) as the next production version;
    its weights.pt says "weights of <src name>", followed by ``weights_bytes`` zero bytes."""
    pixel_reader_onnx(src / "model.onnx", len(classes), channels, size, read_channel)
    (src / "weights.pt").write_bytes(f"weights of {src.name}".encode() + bytes(weights_bytes))
    files = {"model.onnx": src / "model.onnx", "weights.pt": src / "weights.pt"}
    export = export_contract(src / "model.onnx", src / "weights.pt", classes, channels, size)
    with registry.lock():
        card = make_card(registry.next_version(), registry.model_name, files, export, accuracy, profile)
        return registry.publish(files, card)
